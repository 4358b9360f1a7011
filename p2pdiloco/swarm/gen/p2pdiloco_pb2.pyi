from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Caller(_message.Message):
    __slots__ = ("run_id", "protocol", "config_hash", "peer_id", "cert")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    protocol: int
    config_hash: str
    peer_id: str
    cert: bytes
    def __init__(self, run_id: _Optional[str] = ..., protocol: _Optional[int] = ..., config_hash: _Optional[str] = ..., peer_id: _Optional[str] = ..., cert: _Optional[bytes] = ...) -> None: ...

class ReduceRequest(_message.Message):
    __slots__ = ("caller", "kind", "index", "round", "group_id", "weight", "payload")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    kind: str
    index: int
    round: int
    group_id: bytes
    weight: float
    payload: bytes
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ..., kind: _Optional[str] = ..., index: _Optional[int] = ..., round: _Optional[int] = ..., group_id: _Optional[bytes] = ..., weight: _Optional[float] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ReduceReply(_message.Message):
    __slots__ = ("payload", "participants", "total_weight")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    participants: _containers.RepeatedScalarFieldContainer[str]
    total_weight: float
    def __init__(self, payload: _Optional[bytes] = ..., participants: _Optional[_Iterable[str]] = ..., total_weight: _Optional[float] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("caller", "fragments")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    fragments: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ..., fragments: _Optional[_Iterable[int]] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("total_bytes", "sha256", "data")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    sha256: bytes
    data: bytes
    def __init__(self, total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("caller", "address")
    CALLER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    address: str
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ..., address: _Optional[str] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("reachable", "detail")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    detail: str
    def __init__(self, reachable: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...
