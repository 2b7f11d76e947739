"""The FastAPI app, built by `create_app(config)`: no module-level state, so tests and workers each get
their own app, Redis connection, model and metrics.

What runs where: `service.runtime.Runtime` owns the state store, model, micro-batcher and stream worker and
is the app's lifespan (start and stop order there); `service.routes` holds the routes, one router per area,
which reach the Runtime through a FastAPI dependency; `service.http` holds the ASGI plumbing (request id,
latency metrics, body cap, API-key check, error bodies).

Errors: a bad request is a 4xx naming the field (service.http.validation_error); a state-store failure is
a 503 and is counted; nothing a client sends can produce a 500.
"""

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from recsys.config.http import ServiceConfig
from service import schemas
from service.http import BodyLimit, RequestContext, validation_error
from service.routes import admin, events, health, score, users
from service.runtime import Runtime


def create_app(config: ServiceConfig) -> FastAPI:
    config.http.resolved_api_key()  # a bad key stops the app (and every worker) before it serves
    runtime = Runtime(config)
    models = schemas.request_models(config.http.max_candidates, config.http.max_events)
    app = FastAPI(title="recsys scoring service", version="1", lifespan=runtime.lifespan)
    app.state.runtime = runtime
    app.add_exception_handler(RequestValidationError, validation_error)
    # In this order: it is the order of the OpenAPI schema's paths.
    for router in (score.router(models.score), events.router(models.events), users.router(), health.router(),
                   admin.router()):
        app.include_router(router)
    # Added innermost first. The body cap answers before anything else reads the body; the request context is
    # outside it, so its 413 and 408 answers carry a request id and are counted too.
    app.add_middleware(BodyLimit, max_bytes=config.http.max_body_bytes, timeout_s=config.http.body_timeout_s)
    app.add_middleware(RequestContext, metrics=runtime.metrics, access_log=config.http.access_log)
    return app
