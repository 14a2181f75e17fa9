"""Flows: a parent job that runs after all its children succeed (BullMQ's FlowProducer),
and the chain and chord shapes built from it.

Only the leaves are enqueued. Each child carries a FlowLink: the parent's id, queue,
encoded message, the number of siblings and its own index. When a child completes, the
worker
1. sends ``{"index": i, "result": ...}`` to the parent's *flow queue*
   ``<app>.flow.<parent_id>`` with dedup id = the child's job id (so a child that is
   retried after a crash is never counted twice), then
2. reads the flow queue's ``ready`` count; if it equals the number of siblings, sends
   the parent's message with dedup id ``flow:<parent_id>``, so when the last two
   children finish together and both see the full count, the parent is still
   enqueued once.
The parent reads its children's results with ``peek`` (ordered by index). A child that
fails for good fails the parent (recorded in the parent's status, a ``failed`` event)
and the parent never runs. Nested flows work the same way at each level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from conveyor.jobs import state as st
from conveyor.jobs.serialization import FlowLink, fmt_of
from conveyor.model import NewMessage, Properties

if TYPE_CHECKING:
    from conveyor.jobs.app import App, Job, Signature

Inject = Literal["none", "single", "list"]
FLOW_WINDOW = 7 * 86400.0


class ChildResult(msgspec.Struct):
    index: int
    result: msgspec.Raw = msgspec.field(default_factory=lambda: st.NULL)


class Flow:
    """``Flow(parent, children)``: ``parent`` runs once every child has completed.
    Children are signatures or flows. ``inject``: how the parent gets the results --
    ``"none"`` (``current_job().children_results``), ``"single"`` (the first child's
    result as the first argument), ``"list"`` (all results as the first argument)."""

    def __init__(
        self,
        parent: Signature[Any],
        children: Sequence[Signature[Any] | Flow],
        inject: Inject = "none",
    ) -> None:
        if not children:
            raise ValueError("a flow needs at least one child")
        self.parent = parent
        self.children = list(children)
        self.inject = inject

    def enqueue(self) -> FlowJob:
        app = self.parent.task.app
        return app.runtime().call(enqueue_flow(app, self))

    async def aenqueue(self) -> FlowJob:
        app = self.parent.task.app
        rt = await app.astart()
        return await rt.acall(enqueue_flow(app, self))


class FlowJob:
    """The enqueued flow: ``job`` is the parent's handle, ``children`` the children's."""

    def __init__(self, job: Job[Any], children: list[Job[Any] | FlowJob]) -> None:
        self.job = job
        self.children = children
        self.id = job.id

    def result(self, timeout: float | None = None) -> Any:
        return self.job.result(timeout)

    async def aresult(self, timeout: float | None = None) -> Any:
        return await self.job.aresult(timeout)


def chain(*steps: Signature[Any]) -> Flow:
    """Run steps one after another, each getting the previous result as its first
    argument (Celery's chain)."""
    if len(steps) < 2:
        raise ValueError("a chain needs at least two steps")
    node: Signature[Any] | Flow = steps[0]
    for step in steps[1:]:
        node = Flow(step, [node], inject="single")
    assert isinstance(node, Flow)
    return node


def chord(children: Sequence[Signature[Any] | Flow], callback: Signature[Any]) -> Flow:
    """Fan out ``children``, then run ``callback`` with the list of their results as its
    first argument (fan-in)."""
    return Flow(callback, children, inject="list")


async def enqueue_flow(app: App, flow: Flow) -> FlowJob:

    out = await _enqueue_node(app, flow, None)
    assert isinstance(out, FlowJob)
    return out


async def _enqueue_node(app: App, node: Signature[Any] | Flow, link: FlowLink | None) -> Any:
    from conveyor.jobs.app import Job

    rt = app.runtime()
    if not isinstance(node, Flow):
        jid, msg = app.build(node, parent=link)
        q = await app._job_queue(node.queue)
        await rt.conn.backend.send_batch(q.name, [msg])
        return Job(app, jid, node.queue, return_type=node.task.return_type)
    pid, pmsg = app.build(node.parent, parent=link, children=len(node.children), inject=node.inject)
    ct = pmsg.properties.content_type or app.serializer.content_type
    kids: list[Any] = []
    for i, child in enumerate(node.children):
        child_link = FlowLink(
            parent_id=pid,
            parent_queue=node.parent.queue,
            parent_body=pmsg.body,
            parent_content_type=ct,
            siblings=len(node.children),
            index=i,
        )
        kids.append(await _enqueue_node(app, child, child_link))
    job: Job[Any] = Job(app, pid, node.parent.queue, return_type=node.parent.task.return_type)
    return FlowJob(job, kids)


async def _flow_queue(app: App, parent_id: str) -> Any:
    return await app.runtime().queue(
        app.names.flow(parent_id), {"dedup_window": FLOW_WINDOW, "expires": FLOW_WINDOW}
    )


async def child_completed(app: App, link: FlowLink, child_id: str, result: msgspec.Raw) -> bool:
    """Record a child's result; enqueue the parent if it was the last. True if this
    call enqueued the parent."""
    rt = app.runtime()
    fq = await _flow_queue(app, link.parent_id)
    body = st.encode(ChildResult(link.index, result))
    await rt.conn.backend.send_batch(fq.name, [NewMessage(body=body, dedup_id=child_id)])
    if (await fq.stats()).ready < link.siblings:
        return False
    pq = await app._job_queue(link.parent_queue)
    parent = NewMessage(
        body=link.parent_body,
        properties=Properties(content_type=link.parent_content_type, message_id=link.parent_id),
        dedup_id=f"flow:{link.parent_id}",
    )
    (res,) = await rt.conn.backend.send_batch(pq.name, [parent])
    return res.stored


async def children_results(app: App, parent_id: str, n: int) -> list[Any]:
    fq = await _flow_queue(app, parent_id)
    got = await fq.peek(max(n, 1))
    by_index: dict[int, Any] = {}
    for d in got:
        cr = msgspec.json.decode(d.body, type=ChildResult)
        by_index[cr.index] = msgspec.json.decode(cr.result)
    return [by_index.get(i) for i in range(n)]


async def cleanup(app: App, parent_id: str) -> None:
    rt = app.runtime()
    fq = await _flow_queue(app, parent_id)
    await fq.delete()
    rt.forget(fq.name)


async def parent_failed(app: App, link: FlowLink, child_id: str, error: str) -> None:
    """A child failed for good: the parent (and its ancestors) fail without running."""
    from conveyor.jobs.serialization import Serializer

    rec = st.StatusRecord(
        state="failed",
        job_id=link.parent_id,
        queue=link.parent_queue,
        at=st.now(),
        error=f"child {child_id} failed: {error}",
        error_type="ChildFailed",
    )
    env = Serializer(fmt_of(link.parent_content_type)).decode_envelope(
        link.parent_body, link.parent_content_type
    )
    rec.task = env.task
    await app._send_status(rec, final=True)
    if env.parent is not None:
        await parent_failed(app, env.parent, link.parent_id, rec.error or "")
