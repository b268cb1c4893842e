"""A ``Federation`` over a Flower ``Grid``: one site per SuperNode.

:class:`FlowerFederation` maps each :class:`~multimodal_fl.federated.protocol.Request` onto a
Flower ``Message`` (:mod:`.codec`), sends one per SuperNode, and maps the replies back onto
:class:`~multimodal_fl.federated.protocol.Reply` objects, or onto
:class:`~multimodal_fl.federated.protocol.SiteFailure` when a site raised, timed out or cannot be
reached. It holds no FL logic: the server loop
(:func:`~multimodal_fl.federated.server.run_federated`) or any other server program drives it.

Site names: a SuperNode is known to the SuperLink only by a random node id. Before the first
request to a node the federation sends it a ``query`` message of kind
:data:`~.codec.DESCRIBE`; the ClientApp answers with the ``site-name`` of its node config
(without building the site). Replies are returned keyed by site name; the server loop
aggregates them in sorted site order, whatever order they arrived in.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping

from flwr.app import Message
from flwr.serverapp import Grid

from multimodal_fl.federated.flower.codec import (
    DESCRIBE,
    RELEASE,
    content_to_reply,
    message_type,
    request_to_content,
)
from multimodal_fl.federated.protocol import Reply, Request, SiteFailure
from multimodal_fl.progress import ProgressCallback, broadcast_reporter

__all__ = ["FlowerFederation"]

log = logging.getLogger(__name__)

# Flower's error codes (flwr.common.constant.ErrorCode) in words.
#: Flower's reason of a ClientApp that raised: ``<class 'pkg.Name'>:<'message'>``.
_RAISED = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", re.S)

_ERROR_WORDS = {
    1: "the ClientApp could not be loaded",
    2: "the site raised",
    3: "the message was unavailable",
    4: "the reply expired",
    5: "the SuperNode is unavailable (no heartbeat)",
    7: "the app bundle is invalid",
    8: "the ClientApp crashed",
}


def _error_reason(code: int, reason: str) -> str:
    """A Flower error as the server's log shows a site's failure in process: the exception's
    name and its words (``SiteRefused: site site_c: ...``) for a site that raised, else what
    Flower reported, with its code."""
    raised = _RAISED.fullmatch(reason) if code == 2 else None
    if raised is not None:
        return f"{raised.group(1)}: {raised.group(2)}"
    what = _ERROR_WORDS.get(code, "Flower reported an error")
    return f"{what} (Flower error code {code}): {reason}"


class FlowerFederation:
    """A :class:`~multimodal_fl.federated.server.Federation` over a Flower ``Grid``.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid the ServerApp's main was given.
    poll_interval : float
        Seconds between two pulls of replies (Flower's ``send_and_receive`` sleeps 3 s).
    describe_timeout : float
        Seconds a node may take to answer the discovery query that names its site.
    progress : callable or None
        Called with a :class:`~multimodal_fl.progress.ReplyEvent` when a broadcast starts and
        as each site's answer arrives (as the in-process federation reports them).

    Notes
    -----
    Site names are learnt, not configured: :meth:`sites` asks each SuperNode it has not met
    (``query`` message of kind :data:`~.codec.DESCRIBE`) for the ``site-name`` in its node
    config, waiting up to ``describe_timeout``. A node that has not answered by then is left out
    for now; later calls pick up its late answer without waiting, and ask it afresh once the
    question expired.

    Two nodes claiming one name: the one met first keeps it (of nodes met together, the lower
    node id) and the other is ignored, with an error in the log. A node that leaves the
    SuperLink leaves :meth:`sites`.

    ``timeout`` in :meth:`broadcast` bounds the whole exchange (the sites run in parallel).
    Requests go out with the timeout as their Flower TTL, so a late reply expires at the
    SuperLink instead of waiting for a pull that never comes.
    """

    def __init__(
        self, grid: Grid, *, poll_interval: float = 0.2, describe_timeout: float = 60.0,
        progress: ProgressCallback | None = None,
    ) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval={poll_interval}; expected seconds > 0")
        if not describe_timeout > 0:
            raise ValueError(f"describe_timeout={describe_timeout}; expected seconds > 0")
        self.grid = grid
        self.poll_interval = float(poll_interval)
        self.describe_timeout = float(describe_timeout)
        self.progress = progress
        self._node_of: dict[str, int] = {}
        self._ignored: set[int] = set()
        self._describing: dict[int, tuple[str, float]] = {}  # node -> (message id, expiry)

    # -- discovery

    def node_ids(self) -> list[int]:
        """Return the ids of the SuperNodes currently connected to this run, sorted.

        Returns
        -------
        list[int]
            Node ids.
        """
        return sorted(int(n) for n in self.grid.get_node_ids())

    def wait_for_nodes(self, n: int, timeout: float) -> list[int]:
        """Wait until at least ``n`` SuperNodes are connected.

        Parameters
        ----------
        n : int
            How many.
        timeout : float
            Seconds to wait at most.

        Returns
        -------
        list[int]
            The connected node ids (possibly fewer than ``n`` if the time ran out).
        """
        deadline = time.monotonic() + timeout
        nodes = self.node_ids()
        while len(nodes) < n and time.monotonic() < deadline:
            time.sleep(min(self.poll_interval * 5, 1.0))
            nodes = self.node_ids()
        return nodes

    def site_nodes(self) -> dict[str, int]:
        """Return site name -> node id for the sites met so far and still connected.

        Returns
        -------
        dict[str, int]
            The mapping (a copy).
        """
        self.sites()
        return dict(self._node_of)

    def sites(self) -> list[str]:
        """Return the names of the sites whose SuperNode is connected, sorted.

        Meets new nodes first (see the class notes).

        Returns
        -------
        list[str]
            Site names.
        """
        nodes = self.node_ids()
        online = set(nodes)
        for site, node in list(self._node_of.items()):
            if node not in online:
                log.warning("site %s (node %d) left the federation", site, node)
                del self._node_of[site]
        known = set(self._node_of.values()) | self._ignored
        new = [n for n in nodes if n not in known]
        if new:
            self._describe(new)
        return sorted(self._node_of)

    def _describe(self, nodes: list[int]) -> None:
        """Ask ``nodes`` their site names; register the answers (see the class notes).

        A node met for the first time is waited for up to ``describe_timeout``; a node whose
        earlier question is still unanswered is only checked for its answer (no wait), and asked
        afresh once that question's TTL (10 x ``describe_timeout``, at least 60 s) has run out.
        """
        now = time.monotonic()
        for node, (_, expires) in list(self._describing.items()):
            if expires <= now:
                del self._describing[node]
        fresh = [n for n in nodes if n not in self._describing]
        # the question outlives the wait, so that a slow node's late answer is still picked up
        ttl = max(10 * self.describe_timeout, 60.0)
        pending, failed = self._push({n: Request(DESCRIBE, 0) for n in fresh}, ttl)
        for msg_id, node in pending.items():
            self._describing[node] = (msg_id, now + ttl)
        waiting = {msg_id: node for node, (msg_id, _) in self._describing.items()}
        answers = self._collect(waiting, self.describe_timeout if pending else 0.0)
        answers.update(failed)
        for node in sorted(answers):
            answer = answers[node]
            if isinstance(answer, str) and answer.startswith("timed out"):
                continue  # still asked: looked at again at the next call
            self._describing.pop(node, None)
            if not (isinstance(answer, Reply) and answer.site):
                why = answer if isinstance(answer, str) else "an empty site name"
                log.warning("node %d did not name its site (%s); asking again later", node, why)
                continue
            owner = self._node_of.get(answer.site)
            if owner is not None and owner != node:
                log.error(
                    "node %d says it is site %r, which node %d already is; node %d is "
                    "ignored: give each SuperNode its own --node-config site-name",
                    node,
                    answer.site,
                    owner,
                    node,
                )
                self._ignored.add(node)
                continue
            self._node_of[answer.site] = node
            log.info("node %d is site %s", node, answer.site)

    def release(self, timeout: float = 30.0) -> list[str]:
        """Tell every site the run has ended, so its SuperNode stops the run's site worker.

        Parameters
        ----------
        timeout : float
            Seconds to wait for the answers.

        Returns
        -------
        list of str
            The sites that answered (a site that did not keeps its worker until
            ``site-worker-idle`` or its SuperNode ends).
        """
        site_of = {node: site for site, node in self._node_of.items()}
        answers = self._exchange({n: Request(RELEASE, 0) for n in site_of}, timeout)
        done = sorted(site_of[n] for n, a in answers.items() if isinstance(a, Reply))
        missed = sorted(set(site_of.values()) - set(done))
        if missed:
            log.warning("the end of the run did not reach %s: their site workers end after "
                        "site-worker-idle seconds", ", ".join(missed))
        return done

    # -- messaging

    def _push(
        self, requests: Mapping[int, Request], ttl: float | None
    ) -> tuple[dict[str, int], dict[int, Reply | str]]:
        """Push one message per node; return (message id -> node, node -> why not sent)."""
        nodes = sorted(requests)
        if not nodes:
            return {}, {}
        messages = [
            Message(
                request_to_content(requests[n]),
                n,
                message_type(requests[n].kind),
                ttl=None if ttl is None else max(float(ttl), 1.0),
                group_id=str(requests[n].round),
            )
            for n in nodes
        ]
        ids = list(self.grid.push_messages(messages))
        pending: dict[str, int] = {}
        failed: dict[int, Reply | str] = {}
        for i, node in enumerate(nodes):
            msg_id = ids[i] if i < len(ids) else None
            if msg_id:
                pending[str(msg_id)] = node
            else:
                failed[node] = "the SuperLink did not accept the message"
        return pending, failed

    def _collect(
        self, pending: Mapping[str, int], timeout: float | None,
        on_answer: Callable[[int, Reply | str], None] | None = None,
    ) -> dict[int, Reply | str]:
        """Pull replies to ``pending`` (message id -> node) until all came or ``timeout``;
        ``on_answer(node, answer)`` as each arrives (and for each that timed out)."""
        waiting = dict(pending)
        out: dict[int, Reply | str] = {}
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        while waiting:
            for msg in self.grid.pull_messages(list(waiting)):
                replied_to = msg.metadata.reply_to_message_id
                if replied_to not in waiting:
                    continue
                node = waiting.pop(replied_to)
                out[node] = self._answer(msg)
                if on_answer is not None:
                    on_answer(node, out[node])
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        for node in waiting.values():
            out[node] = f"timed out: no reply within {timeout:g} s"
            if on_answer is not None:
                on_answer(node, out[node])
        return out

    @staticmethod
    def _answer(msg: Message) -> Reply | str:
        """A reply message as a :class:`Reply`, or why it is none."""
        if msg.has_error():
            return _error_reason(int(msg.error.code), str(msg.error.reason))
        try:
            return content_to_reply(msg.content)
        except (ValueError, TypeError, KeyError) as exc:
            return f"unreadable reply: {exc}"

    def _exchange(
        self, requests: Mapping[int, Request], timeout: float | None,
        on_answer: Callable[[int, Reply | str], None] | None = None,
    ) -> dict[int, Reply | str]:
        """Send one request per node; return node -> reply, or node -> why there is none."""
        pending, out = self._push(requests, timeout)
        if on_answer is not None:
            for node, why in out.items():
                on_answer(node, why)
        out.update(self._collect(pending, timeout, on_answer))
        return out

    def broadcast(
        self, requests: Mapping[str, Request], timeout: float | None = None
    ) -> dict[str, Reply | SiteFailure]:
        """Send one request per site, all at once, and gather the replies.

        Parameters
        ----------
        requests : Mapping[str, Request]
            Site name -> the request for that site.
        timeout : float or None
            Seconds to wait for all replies (None: as long as it takes).

        Returns
        -------
        dict[str, Reply | SiteFailure]
            One entry per requested site, in sorted site order.
        """
        answers: dict[str, Reply | SiteFailure] = {}
        by_node: dict[int, Request] = {}
        site_of: dict[int, str] = {}
        for site in sorted(requests):
            node = self._node_of.get(site)
            if node is None:
                answers[site] = SiteFailure(
                    site, f"unknown site {site!r}; connected sites: {sorted(self._node_of)}"
                )
                continue
            by_node[node] = requests[site]
            site_of[node] = site
        report = broadcast_reporter(self.progress, requests)
        for site in answers:  # unknown sites: failed before anything was sent
            report(site, False)
        if by_node:
            def arrived(node: int, answer: Reply | str) -> None:
                report(site_of[node], not isinstance(answer, str))

            for node, answer in self._exchange(by_node, timeout, arrived).items():
                site = site_of[node]
                answers[site] = SiteFailure(site, answer) if isinstance(answer, str) else answer
        return {site: answers[site] for site in sorted(answers)}
