"""Fixtures shared by the Azure Batch tests: local Batch peers with a pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fakes.batch_peer import BatchPeer

MakePeer = Callable[..., BatchPeer]


@pytest.fixture
def make_peer() -> Iterator[MakePeer]:
    """Start Batch peers (each with a pool ``fanout`` of two idle nodes); stop them after."""
    peers: list[BatchPeer] = []

    def make(**kwargs: Any) -> BatchPeer:
        peer = BatchPeer(**kwargs).start()
        peers.append(peer)
        peer.add_pool("fanout", dedicated={"idle": 2})
        return peer

    yield make
    for peer in peers:
        peer.stop()


@pytest.fixture
def peer(make_peer: MakePeer) -> BatchPeer:
    """One Batch peer."""
    return make_peer()
