"""Ray jobs of the offline path (imports recsys, never service):

- `pipelines.preprocess.run_preprocess`: raw logs -> dataset folder (Ray Data; equals recsys.data.prepare)
- `pipelines.train.run_train`: the one training loop on Ray Train workers, each on its Ray Data user shard;
  best weights -> bundle
- `pipelines.evaluate.run_evaluate`: batch evaluation of a bundle on Ray actors
- `pipelines.rebuild_state.run_rebuild_state`: per-user streaming states for a new model version
- `pipelines.runtime`: the one place Ray is started (local, bounded) or joined (cluster)

Import the submodules directly: importing this package does not import Ray.
"""
