"""A real S3 HTTP server on loopback for the object-storage tests.

moto's server mode serves the S3 REST API from a thread of this process on
``127.0.0.1`` and a free port; s3fs (through fsspec) talks to it over HTTP as it
would to AWS, found through the standard ``AWS_ENDPOINT_URL`` variable. Child
processes (torchrun, ``ckpt`` subprocesses) inherit the variables and reach the
same server. Each test gets its own bucket.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "ckpt-test-key",
    "AWS_SECRET_ACCESS_KEY": "ckpt-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """The loopback server: its endpoint, and stop/start to play an outage.

    moto keeps its buckets in this process's memory, so a stopped and restarted
    server on the same port still has every object written before the stop.
    """

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.running = True

    def stop(self) -> None:
        """Stop answering (connections are refused) until :meth:`start`."""
        if self.running:
            self._server.stop()
            self.running = False

    def start(self) -> None:
        """Serve again on the same port, with the same objects."""
        if not self.running:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            self.running = True

    def env(self) -> dict[str, str]:
        """The environment a client (this process or a child) needs to reach the server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One loopback S3 server for the session."""
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()


def clear_s3fs_caches() -> None:
    """Forget cached s3fs instances and listings (each test starts with a fresh client)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The server's endpoint and credentials in ``os.environ`` for this test."""
    s3_server.start()  # a test that stopped it and failed must not break the next one
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    clear_s3fs_caches()
    yield s3_server
    s3_server.start()
    clear_s3fs_caches()


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A fresh, empty bucket: ``s3://<name>``."""
    import boto3

    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env.endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"
