"""Request and response bodies of the HTTP API (pydantic; they are also the OpenAPI schema).

Requests are strict: no string-to-int coercion, no unknown fields, ids non-negative and below 2^53 (the
state store's Lua scripts hold numbers as doubles). Item and category ids are raw catalogue ids, stored as
sent; the served bundle's vocabulary maps them to the model's rows (service.model_state). List caps come from the config, so the request models
are built per app by `request_models(...)`; a violation is a 422 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, create_model,
                      model_validator, with_config)
from typing_extensions import NotRequired, TypedDict

MAX_ID = 2**53 - 1


def _integral(v):
    # JSON Schema's "integer" includes 5.0; strings, booleans and 5.5 stay type errors.
    return int(v) if type(v) is float and v.is_integer() else v


def whole(lo: int, hi: int):
    # The bounds before the validator, so the OpenAPI schema states them as minimum/maximum (after it they
    # came out as "ge"/"le", which JSON Schema does not know).
    return Annotated[int, Field(ge=lo, le=hi), BeforeValidator(_integral)]


Id = whole(0, MAX_ID)
# Stored events never use id 0: it is the padding id of every history.
EventId = whole(1, MAX_ID)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _candidate(id_type) -> type:
    # Raw (catalogue) ids. Any id is accepted: one the served bundle's vocabulary does not know scores with
    # the out-of-vocabulary row. A TypedDict, not a model: 200 model instances per request cost more than
    # checking them.
    category = Annotated[id_type | None, Field(description="omitted or null: the item's category in the served "
                                               "bundle's vocabulary (the out-of-vocabulary category for an unknown item)")]
    return with_config(ConfigDict(extra="forbid", strict=True))(
        TypedDict("Candidate", {"item_id": id_type, "category_id": NotRequired[category]}))


class Event(_Request):
    event_id: str = Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
    user_id: Id
    item_id: EventId
    category_id: EventId
    action: whole(0, 127) = 0
    ts: Id = Field(description="event time, ms since the epoch")


class ReloadRequest(_Request):
    bundle: str = Field(min_length=1, max_length=4096, description="model bundle folder on the server")
    rebuild: bool = Field(default=True, description="rebuild every user's state for the new version first")


@dataclass(frozen=True)
class RequestModels:
    score: type[BaseModel]
    events: type[BaseModel]


class _ScoreRequest(_Request):
    # `_all_ints`: the same request with every id a plain int, i.e. the schema without `_integral`, whose
    # Python call per id was most of a 200-candidate request's validation (0.38 -> 0.08 ms). What it accepts,
    # the full schema accepts with the same values; anything else (5.0 ids, every error) goes through the
    # full schema, so errors and the OpenAPI schema are the full schema's.
    _all_ints: ClassVar[TypeAdapter]

    @model_validator(mode="wrap")
    @classmethod
    def _ints_first(cls, data, handler):
        if isinstance(data, dict):
            try:
                return cls.model_construct(**cls._all_ints.validate_python(data))
            except ValidationError:
                pass
        return handler(data)


def request_models(max_candidates: int, max_events: int) -> RequestModels:
    def ids(id_type) -> dict:
        return {"user_id": id_type,
                "candidates": Annotated[list[_candidate(id_type)], Field(min_length=1, max_length=max_candidates)]}

    score = create_model("ScoreRequest", __base__=_ScoreRequest, **{k: (t, ...) for k, t in ids(Id).items()},
                         explain=(bool, Field(default=False, description="return each candidate's retrieved history "
                                                                         "events")))
    plain = ids(Annotated[int, Field(ge=0, le=MAX_ID)]) | {"explain": NotRequired[bool]}
    score._all_ints = TypeAdapter(with_config(ConfigDict(extra="forbid", strict=True))(
        TypedDict("ScoreRequestInts", plain)))
    events = create_model(
        "EventsRequest",
        __base__=_Request,
        events=(list[Event], Field(min_length=1, max_length=max_events)),
    )
    return RequestModels(score=score, events=events)


class RetrievedEvent(BaseModel):
    """A history event the search stage kept for a candidate, in search-score order (raw ids, as stored)."""

    position: int = Field(description="1 = the user's most recent event")
    item_id: int
    category_id: int
    ts: int


class ScoreResponse(BaseModel):
    user_id: int
    model_version: str
    history_length: int
    scores: list[float]
    explanations: list[list[RetrievedEvent]] | None = None
    memory: Literal["stored", "rebuilt", "empty"] | None = Field(
        None, description="models with memory branches: the user's memory was the stored state kept current by "
        "the stream worker, rebuilt in this request (no current state), or empty (no current state and a "
        "sequence longer than http.memory_rebuild_max_events)")


class EventsResponse(BaseModel):
    accepted: int


class UserResponse(BaseModel):
    user_id: int
    history_length: int
    last_event_ts: int | None
    last_applied_event_id: str | None
    state_version: str | None = Field(description="model version of the stored state, if current")
    state_rev: int | None = Field(description="events-applied revision the stored state corresponds to")
    rev: int


class EraseResponse(BaseModel):
    user_id: int
    keys_deleted: int = Field(description="Redis keys of the user deleted (0: nothing was stored)")
    dead_letters_deleted: int = Field(description="dead-letter entries of the user deleted")
    stream_position: str = Field(description="the user's events accepted up to this stream entry id are dropped "
                                 "if a worker has not applied them yet; later ones start a new history")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None
    rebuilt_users: int


class Error(BaseModel):
    detail: str


class FieldError(BaseModel):
    field: str = Field(description="where: body.candidates.3.item_id, path.user_id, header.X-API-Key, ...")
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    detail: str = Field(description="the first errors as one line, each starting with its field")
    errors: list[FieldError]


def error_responses(*codes: int) -> dict:
    """OpenAPI `responses` for the error statuses a route can answer (422 is always possible)."""
    text = {401: "X-API-Key missing", 403: "X-API-Key invalid, or writes disabled (no key configured)",
            409: "conflict", 413: "body too large",
            429: "the event stream backlog is at stream.max_backlog: retry after Retry-After seconds", 503: "no model loaded, or the state store is unavailable"}
    out: dict = {422: {"model": ValidationErrorBody, "description": "invalid request; names the field"},
                 413: {"model": Error, "description": text[413]}}
    out.update({c: {"model": Error, "description": text[c]} for c in codes})
    return out


class Health(BaseModel):
    status: str
    model_version: str | None = None
    desired_version: str | None = Field(None, description="the version published by the last reload (every "
                                        "process converges to it within reload_poll_s); None: none published")
    detail: str | None = None
