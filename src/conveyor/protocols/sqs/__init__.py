"""The Amazon SQS API, sans I/O: requests in, responses out.

``codec`` parses both wire protocols (AWS JSON 1.0 and query/XML) into the typed
requests of ``shapes`` and encodes results and errors; ``messages`` validates bodies
and attributes and computes the MD5s; ``attributes`` maps queue attributes onto
engine options; ``names`` handles queue names, URLs and ARNs; ``sigv4`` checks
signatures. The server glue (conveyor.server.sqs) turns requests into Broker calls.
"""

from conveyor.protocols.sqs.errors import SqsError

__all__ = ["SqsError"]
