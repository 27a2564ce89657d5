"""`anostyle serve` cannot be locked by clients that send nothing (issue 19, item 1): an error
answer closes its connection, a connection that does not finish its request in time is closed
whatever the route, and the request limit counts requests whose body has arrived, not open
connections. Real uvicorn on 127.0.0.1 only, bounded loops."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time

import pytest
from test_app import model, multipart, nets, post_images  # noqa: F401 (fixtures)
from test_failclosed_serve import TOKEN, read_answer

from anomaly.app import server as app_server
from anomaly.app.model import ServeOptions
from anomaly.app.server import BackgroundServer, create_app, upload_limits
from encoder_helpers import one_thread  # noqa: F401 (autouse fixture)

LIMIT = 4  # requests (and connections) the server is given in these tests


def idle_client(port: int, head: bytes) -> tuple[socket.socket, bytes]:
    """Send `head` (a request line and headers announcing a large body), read what the server
    answers within 1 s, send one body byte and keep the socket open (the issue's attacker)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head)
    sock.settimeout(1.0)
    answer = b""
    try:
        while b"\r\n\r\n" not in answer and (part := sock.recv(65536)):
            answer += part
    except TimeoutError:
        pass
    try:
        sock.sendall(b"x")
    except OSError:  # already closed by the server
        pass
    return sock, answer


def get_healthz(port: int, headers: dict) -> tuple[int, float]:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/healthz", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, time.monotonic() - start
    finally:
        conn.close()


@pytest.mark.parametrize("token", [None, TOKEN], ids=["405", "401"])
def test_idle_clients_do_not_lock_out_others(model, monkeypatch, token):  # noqa: F811
    """The issue's attack with more clients than the limit: each posts to /api/info with
    Content-Length 100000000, reads the 405 (401 with a login), sends one byte and idles; 
    another LIMIT * 2 connections send nothing at all. A normal request still answers 200 at
    once, every error answer says 'connection: close' and its connection is closed."""
    monkeypatch.setattr(app_server, "CONNECTION_LIMIT", LIMIT)
    monkeypatch.setattr(app_server, "REQUEST_LIMIT", LIMIT, raising=False)
    app = create_app(model, upload_limits(ServeOptions("n", "e", "s")), token=token)
    auth = {"authorization": f"Bearer {token}"} if token else {}
    head = (b"POST /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n")
    sockets = []
    try:
        with BackgroundServer(app, header_timeout=2.0) as server:
            answers = []
            for _ in range(LIMIT * 2):
                sock, answer = idle_client(server.port, head)
                sockets.append(sock)
                answers.append(answer)
            for _ in range(LIMIT * 2):
                sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            statuses = [get_healthz(server.port, auth) for _ in range(5)]
            closed = []
            for sock in sockets[:LIMIT * 2]:
                _rest, seconds = read_answer(sock, 1.0)
                closed.append(seconds < 0.9)  # the server closed it before the 1 s wait
    finally:
        for sock in sockets:
            sock.close()
    want = b"HTTP/1.1 401" if token else b"HTTP/1.1 405"
    assert all(a.startswith(want) for a in answers), answers[:1]
    assert all(b"connection: close" in a.lower() for a in answers), answers[:1]
    assert all(closed), closed
    assert [s for s, _ in statuses] == [200] * 5, statuses
    assert max(seconds for _, seconds in statuses) < 1.0, statuses


async def never_answers(scope, receive, send):
    """An ASGI route without a time limit of its own: it never answers (it ends when the
    connection is gone)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def test_a_request_not_answered_in_time_is_closed_whatever_the_route(monkeypatch):
    """The connection's own limit: request_timeout + REQUEST_GRACE after the request head, a 408
    when the body never came, and the connection is closed."""
    monkeypatch.setattr(app_server, "REQUEST_GRACE", 0.2)
    with BackgroundServer(never_answers, request_timeout=0.5) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /anything HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nx")
        answer, seconds = read_answer(sock, 5.0)
    assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer, answer
    detail = json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
    assert detail == "The request did not arrive within the server's limit of 0.5 s."
    assert 0.6 < seconds < 2.0, seconds


def test_an_answer_before_the_body_closes_the_connection(model):  # noqa: F811
    """A 200 to a request whose body was not read: the connection closes instead of waiting
    for (and discarding) the rest of the body for as long as the client sends it."""
    app = create_app(model, upload_limits(ServeOptions("n", "e", "s")))
    with BackgroundServer(app) as server, socket.create_connection(
            ("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")
        answer, seconds = read_answer(sock, 3.0)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}'), answer
    assert seconds < 1.0, seconds


def test_the_request_limit_counts_requests_whose_body_arrived(nets, model, monkeypatch):  # noqa: F811
    """LIMIT connections that sent a scoring request's head but no body hold no place: a
    complete request still answers 200; the limit answers 503 only to complete requests."""
    monkeypatch.setattr(app_server, "REQUEST_LIMIT", 1)
    app = create_app(model, upload_limits(ServeOptions("n", "e", "s")))
    body, headers = multipart(("image", "x.png", nets["png"]))
    head = (f"POST /api/score?images=false HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"{headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with BackgroundServer(app) as server:
        waiting = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                   for _ in range(LIMIT)]
        try:
            for sock in waiting:
                sock.sendall(head + body[:10])
            time.sleep(0.2)
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("POST", "/api/score?images=false", body=body, headers=headers)
            response = conn.getresponse()
            assert response.status == 200, response.read()
            conn.close()
            waiting[0].sendall(body[10:])  # now complete: it takes the one place and answers
            answer = waiting[0].recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        finally:
            for sock in waiting:
                sock.close()
    admission = app_server.Admission(None, limit=1)
    admission.active = 1  # the one place is taken: a complete request is refused
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [], "method": "GET", "path": "/"}
    asyncio.run(admission(scope, receive, send))
    assert sent[0]["status"] == 503 and admission.active == 1
    assert json.loads(sent[1]["body"])["detail"] == ("The server is answering 1 requests "
                                                     "already; try again in a few seconds.")


def test_body_bytes_in_flight_are_bounded_across_requests():
    """What has arrived counts, not what Content-Length announces; given back when read."""
    from anomaly.app import uploads

    budget = uploads.BodyBudget(1000)
    limits = uploads.UploadLimits(max_bytes=10_000, max_files=4, max_pixels=10**6)

    async def chunks(n):  # a part's head, then zeros: 400 bytes each
        head = b'--B\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'
        for i in range(n):
            yield (head if i == 0 else b"").ljust(400, b"\0")

    with pytest.raises(uploads.BodyBudgetFull):
        asyncio.run(uploads.read_uploads("multipart/form-data; boundary=B", "9000", chunks(5),
                                         limits, budget=budget))
    assert budget.used == 0
    budget.take(900)  # another request holds 900 bytes: 200 more do not fit
    with pytest.raises(uploads.BodyBudgetFull):
        asyncio.run(uploads.read_uploads("multipart/form-data; boundary=B", None, chunks(1),
                                         limits, budget=budget))
    assert budget.used == 900


def test_a_complete_request_over_the_limit_is_a_503(nets, model, monkeypatch):  # noqa: F811
    """The place is taken when the body has arrived: with none free, the upload is read and
    then refused with one sentence (and the connection closed)."""
    from fastapi.testclient import TestClient

    monkeypatch.setattr(app_server, "REQUEST_LIMIT", 0)
    client = TestClient(create_app(model, upload_limits(ServeOptions("n", "e", "s"))))
    r = post_images(client, ("x.png", nets["png"]))
    assert r.status_code == 503 and r.headers["connection"] == "close"
    assert r.json()["detail"] == ("The server is answering 0 requests already; try again in a "
                                  "few seconds.")
    assert client.get("/healthz").status_code == 503  # without a body: refused at once
