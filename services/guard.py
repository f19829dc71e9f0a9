"""The public service's method handlers: parse, authenticate and bound every call before the servicer sees it.

Built from the service descriptor (so RPCs added to the proto are covered without listing them here):
- requests arrive as bytes and are parsed here: a malformed protobuf is INVALID_ARGUMENT (grpcio's own
  deserializer failure would be UNKNOWN/INTERNAL);
- `authorization: Bearer <key>` is checked (services.auth) and the key id set in `key_id_var` for the servicer,
  the logs and the metrics; missing/wrong keys get UNAUTHENTICATED (health is a separate servicer: exempt);
- calls listed in `bounded` hold one concurrent-call slot of their key (services.limits) for their lifetime.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from moss_speech.services.auth import ApiKeys, AuthError, authenticate, key_id_var
from moss_speech.services.limits import Limiter, LimitError
from moss_speech.services.logging import get_logger

log = get_logger("guard")

MALFORMED = "malformed request message (not a valid protobuf of this method's request type)"


class MalformedMessage(Exception):
    """A streamed request message that does not parse (the servicer maps it to INVALID_ARGUMENT)."""


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def guarded_handler(
    descriptor: ServiceDescriptor,
    servicer: Any,
    keys: ApiKeys | None,
    limiter: Limiter,
    bounded: tuple[str, ...],
    retry_metadata: Callable[[float, str], tuple],
) -> grpc.GenericRpcHandler:
    handlers = {}
    for method in descriptor.methods:
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        impl = getattr(servicer, method.name)
        kind = (method.client_streaming, method.server_streaming)
        behavior = _behavior(impl, req_cls, kind, keys, limiter, method.name in bounded, retry_metadata)
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        handlers[method.name] = make(
            behavior, request_deserializer=None, response_serializer=resp_cls.SerializeToString
        )
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


def _behavior(
    impl, req_cls, kind: tuple[bool, bool], keys: ApiKeys | None, limiter: Limiter, bounded: bool, retry_metadata
):
    client_streaming, server_streaming = kind

    async def admit(context) -> tuple[str, Any]:
        """The caller's key id and its call slot (a context manager), or abort."""
        try:
            key_id = authenticate(_authorization(context), keys)
        except AuthError as e:
            log.info("unauthenticated", extra={"fields": {"error": str(e)}})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        key_id_var.set(key_id)
        slot = limiter.stream(key_id) if bounded else None
        if slot is not None:
            try:
                slot.__enter__()
            except LimitError as e:
                details = f"{e}; retry in {math.ceil(e.retry_after)} s"
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    details,
                    trailing_metadata=retry_metadata(e.retry_after, details),
                )
        return key_id, slot

    async def parse_one(raw: bytes, context) -> Any:
        try:
            return req_cls.FromString(raw)
        except (DecodeError, RuntimeWarning, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)

    async def parse_stream(raws: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in raws:
            try:
                yield req_cls.FromString(raw)
            except (DecodeError, RuntimeWarning, ValueError):
                raise MalformedMessage(MALFORMED) from None

    def release(slot) -> None:
        if slot is not None:
            slot.__exit__(None, None, None)

    if server_streaming:

        async def streaming(request, context):
            _, slot = await admit(context)
            try:
                req = parse_stream(request) if client_streaming else await parse_one(request, context)
                async for response in impl(req, context):
                    yield response
            finally:
                release(slot)

        return streaming

    async def unary(request, context):
        _, slot = await admit(context)
        try:
            req = parse_stream(request) if client_streaming else await parse_one(request, context)
            return await impl(req, context)
        finally:
            release(slot)

    return unary
