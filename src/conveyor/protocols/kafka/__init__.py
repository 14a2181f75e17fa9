"""Kafka wire protocol (sans-I/O): request framing and decoding, response encoding.

Structures come from kafka-python's ``kafka.protocol`` classes; this package adds the
framing, the version table conveyor advertises and the error codes it uses.
"""

from conveyor.protocols.kafka.codec import (
    API_VERSIONS,
    FrameReader,
    FrameTooLarge,
    Request,
    UnsupportedRequest,
    api_versions_response,
    decode_request,
    encode_fetch_response,
    encode_response,
)

__all__ = [
    "API_VERSIONS",
    "FrameReader",
    "FrameTooLarge",
    "Request",
    "UnsupportedRequest",
    "api_versions_response",
    "decode_request",
    "encode_fetch_response",
    "encode_response",
]
