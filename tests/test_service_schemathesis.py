"""Property-based fuzzing of every operation of the OpenAPI schema over real HTTP (schemathesis): generated
valid and invalid requests never get a 5xx, and responses match the documented schemas."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from recsys.bundle import export_bundle
from recsys.config.experiment import ExperimentConfig
from recsys.config.model import ModelConfig
from recsys.models import build_model
from test_service_support import API_KEY, LiveServer, service_config


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    from service.app import create_app

    torch.manual_seed(0)
    cfg = ExperimentConfig(data="benchmarks/ml-latest-small",
                           model=ModelConfig(max_len=16, top_k=4, dim_rep=4, dim_att=4, mlp=[8], init_std=0.3))
    bundle = export_bundle(build_model(cfg.model, 100, 10), cfg, tmp_path_factory.mktemp("bundle") / "b", metrics={})
    config = service_config(None, tmp_path_factory.mktemp("fuzz"), bundle=str(bundle), max_candidates=50,
                            max_events=50)
    with LiveServer(create_app(config)) as srv:
        yield srv


WITH_INPUT = ["POST /v1/score", "POST /v1/events", "GET /v1/users/{user_id}", "POST /v1/admin/reload"]
NO_INPUT = ["GET /healthz", "GET /readyz", "GET /metrics"]
CASES = ([(op, GenerationMode.POSITIVE) for op in WITH_INPUT + NO_INPUT]
         + [(op, GenerationMode.NEGATIVE) for op in WITH_INPUT])  # an operation with no input has no invalid one


@pytest.mark.parametrize("label,mode", CASES)
def test_no_server_errors(live_server, label, mode):
    # schemathesis' own pytest plugin does not run under pytest 9, so each operation is driven by hypothesis
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    op = schema.find_operation_by_label(label)
    assert op is not None, f"{label} missing from the OpenAPI schema"
    checks = [not_a_server_error] + ([status_code_conformance, response_schema_conformance]
                                     if mode == GenerationMode.POSITIVE else [])

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case):
        case.call_and_validate(base_url=live_server.url, headers={"X-API-Key": API_KEY}, timeout=30, checks=checks)

    run()
