"""Reduce on the wire, copying each payload once on each side.

The messages are proto/p2pdiloco.proto's, byte for byte, but on the gRPC path and the bulk port
(bulk.py) the payload is never held by a protobuf message: a protobuf `bytes` field costs a full
copy when it is set, serialized, parsed and read. The sender serializes the message without its
payload and appends the payload field (tag, length, bytes) as separate buffers; the receiver walks
the message's top-level fields, keeps the payload as a view of the received buffer, and parses the
rest with protobuf. (Fields may come in any order on the wire, and of a singular field that
appears twice the last one wins, as in protobuf.)
"""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from ..codecs import CodecError, Encoded, parse_header
from .gen import p2pdiloco_pb2 as pb

SERVICE = "p2pdiloco.v1.Averaging"
REQUEST_PAYLOAD, REPLY_PAYLOAD = 7, 1  # field numbers of ReduceRequest.payload and ReduceReply.payload
_NO_BYTES = memoryview(b"")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        b = data[i]
        n |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return n, i
        shift += 7


def with_payload(head: bytes, field_number: int, pieces: list) -> list:
    """A serialized message without its payload (`head`), followed by the payload field: as
    buffers to join or to write one after the other."""
    size = sum(len(p) for p in pieces)
    return [head, _varint(field_number << 3 | 2), _varint(size), *pieces]


def _fields(data, name: str):
    """The top-level fields of a serialized message: (start, field number, where a length-delimited
    value starts or -1, end). `end` may pass len(data): the caller decides whether that is truncation."""
    i = 0
    while i < len(data):
        start = i
        key, i = _read_varint(data, i)
        wire_type, value = key & 7, -1
        if wire_type == 0:
            i = _read_varint(data, i)[1]
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        elif wire_type == 2:
            length, value = _read_varint(data, i)
            i = value + length
        else:
            raise DecodeError(f"wire type {wire_type} in a message of {name}")
        yield start, key >> 3, value, i


def split_payload(data: bytes, field_number: int, message_type):
    """Parse a serialized message whose `field_number` is a bytes field: (the message without that
    field, that field's value as a view of `data`). Raises DecodeError on a malformed message."""
    view, payload, rest = memoryview(data), _NO_BYTES, []
    for start, number, value, end in _fields(data, message_type.__name__):
        if end > len(data):
            raise DecodeError(f"truncated {message_type.__name__}")
        if number == field_number and value >= 0:
            payload = view[value:end]
        else:
            rest.append(view[start:end])
    return message_type.FromString(b"".join(rest)), payload


@dataclass(frozen=True)
class InPlace:
    """A payload whose tail the transport wrote straight into its destination (bulk.py, for an fp32
    mean: the values land in the mean itself). `head` is the rest of it, the codec's header."""
    head: memoryview
    tail_bytes: int


def check_in_place(payload: InPlace, numel: int) -> None:
    """That an InPlace payload is the fp32 encoding of `numel` values, its values being the tail
    written in place; CodecError if not (that tail is then no mean at all)."""
    codec, n, rest = parse_header(payload.head)
    if codec.name != "fp32" or n != numel or len(rest) or payload.tail_bytes != 4 * numel:
        raise CodecError(f"a {codec.name} payload of {n} values came where the fp32 mean of {numel} values was expected")


def split_payload_around(prefix, tail_bytes: int, field_number: int, message_type):
    """`split_payload` for a message whose last `tail_bytes` bytes went elsewhere: (the message
    without its payload, InPlace), or None unless the payload is the message's last field and
    runs into that tail (then the caller joins the bytes and uses `split_payload`)."""
    view, rest, total = memoryview(prefix), [], len(prefix) + tail_bytes
    for start, number, value, end in _fields(prefix, message_type.__name__):
        if number == field_number and value >= 0:
            if end == total:
                return message_type.FromString(b"".join(rest)), InPlace(view[value:], tail_bytes)
        elif end <= len(prefix):
            rest.append(view[start:end])
        if end >= len(prefix):
            return None
    return None


def parse_payload(payload) -> Encoded:
    """`codecs.from_bytes` without its copy: the tensors view `payload` (a received message, which
    nothing writes to; they are only read). Same checks, same errors."""
    codec, numel, body = parse_header(payload)
    return codec.from_bytes(body, numel, copy=False)


def split_request(data: bytes) -> tuple[pb.ReduceRequest, memoryview]:
    return split_payload(data, REQUEST_PAYLOAD, pb.ReduceRequest)


def split_reply(data: bytes) -> tuple[pb.ReduceReply, memoryview]:
    return split_payload(data, REPLY_PAYLOAD, pb.ReduceReply)
