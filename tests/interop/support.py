"""Test support: a chatd process manager, a slixmpp client with awaitable
queues, and a raw XMPP socket client for input slixmpp cannot produce."""

from __future__ import annotations

import asyncio
import base64
import codecs
import os
import queue
import re
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

DOMAIN = "localhost"
PASSWORD = "s3cret-pw"

ALICE = "+15550000001"
BOB = "+15550000002"
CAROL = "+15550000003"
DAVE = "+15550000004"
DEFAULT_USERS = (ALICE, BOB, CAROL, DAVE)

STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def local_of(phone: str) -> str:
    return phone.lstrip("+")


def bare(phone: str) -> str:
    return f"{local_of(phone)}@{DOMAIN}"


# --------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------


class ChatdServer:
    """One `chatd serve` process over a data directory."""

    def __init__(self, binary: str, data_dir: Path, *, config: dict | None = None,
                 allow_plaintext: bool = False, log_dir: Path | None = None):
        self.binary = binary
        self.data_dir = Path(data_dir)
        self.allow_plaintext = allow_plaintext
        self.config_path: Path | None = None
        self.log_dir = Path(log_dir or self.data_dir.parent)
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.c2s_port: int | None = None
        self.tls_port: int | None = None
        self.starts = 0
        self.log_paths: list[Path] = []
        if config:
            self.config_path = self.data_dir.parent / f"{self.data_dir.name}.toml"
            self.config_path.write_text(to_toml(config))

    # -- CLI ---------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [self.binary, "user", *args, "--data-dir", str(self.data_dir)]
        if self.config_path:
            cmd += ["--config", str(self.config_path)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
        return r

    def add_user(self, phone: str, password: str = PASSWORD) -> None:
        self.cli("add", phone, "--password", password)

    def list_users(self) -> list[str]:
        return [line.strip() for line in self.cli("list").stdout.splitlines() if line.strip()]

    # -- process -------------------------------------------------------------

    def start(self, timeout: float = 30) -> "ChatdServer":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log_path = self.log_dir / f"{self.data_dir.name}.stderr.{self.starts}.log"
        self.log_paths.append(log_path)
        cmd = [self.binary, "serve", "--data-dir", str(self.data_dir), "--domain", DOMAIN,
               "--c2s", f"{self.host}:0", "--c2s-tls", f"{self.host}:0"]
        if self.allow_plaintext:
            cmd.append("--allow-plaintext")
        if self.config_path:
            cmd += ["--config", str(self.config_path)]
        env = dict(os.environ)
        env.setdefault("NO_COLOR", "1")
        env.setdefault("CHATD_LOG", "info,chatd=debug,fjall=warn,lsm_tree=warn")
        log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
        log.close()
        lines: queue.Queue = queue.Queue()

        def reader(stream):
            for raw in stream:
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=reader, args=(self.proc.stdout,), daemon=True).start()
        self.c2s_port = self.tls_port = None
        deadline = time.monotonic() + timeout
        while self.c2s_port is None or self.tls_port is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill9()
                raise AssertionError(f"chatd did not report its listeners in {timeout}s: {self.log_tail()}")
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise AssertionError(f"chatd exited ({self.proc.returncode}) before listening: {self.log_tail()}")
            m = re.match(r"listening (c2s|c2s-tls) ([\d.]+):(\d+)\s*$", line)
            if m:
                if m.group(1) == "c2s":
                    self.c2s_port = int(m.group(3))
                else:
                    self.tls_port = int(m.group(3))
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError("chatd did not exit within %ss of SIGTERM" % timeout)
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def holds_connection(self, client_port: int) -> bool:
        """Whether the server process still has the TCP connection from
        `client_port` open (Linux: /proc/net/tcp and /proc/PID/fd)."""
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                rows = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                f = row.split()
                if int(f[1].rsplit(":", 1)[1], 16) == self.c2s_port and int(f[2].rsplit(":", 1)[1], 16) == client_port:
                    inodes.add(f[9])
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                m = re.match(r"socket:\[(\d+)\]", os.readlink(fd))
            except OSError:
                continue
            if m and m.group(1) in inodes:
                return True
        return False

    def log_tail(self, n: int = 60) -> str:
        out = []
        for p in self.log_paths[-2:]:
            try:
                text = p.read_text(errors="replace")
            except OSError:
                continue
            out.append(f"--- {p.name}\n" + "\n".join(text.splitlines()[-n:]))
        return "\n".join(out)


def to_toml(cfg: dict) -> str:
    """Serialises a two-level dict of scalars as TOML."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    top = [f"{k} = {val(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    sections = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            sections.append(f"[{k}]\n" + "\n".join(f"{kk} = {val(vv)}" for kk, vv in v.items()))
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


# --------------------------------------------------------------------------
# slixmpp client
# --------------------------------------------------------------------------

LIVE_CLIENTS: list = []


class LoginFailed(Exception):
    pass


class Client(slixmpp.ClientXMPP):
    """A slixmpp client that records what it receives into queues.

    `sm=True` loads XEP-0198; otherwise the client still answers pings
    (XEP-0199), which is how chatd confirms delivery to it."""

    def __init__(self, server: ChatdServer, phone: str, password: str = PASSWORD, *,
                 resource: str | None = None, sm: bool = False, mech: str | None = None,
                 direct_tls: bool = False):
        jid = bare(phone) + (f"/{resource}" if resource else "")
        super().__init__(jid, password, sasl_mech=mech)
        self.chatd = server
        self.phone = phone
        self.direct_tls = direct_tls
        self.enable_direct_tls = direct_tls
        self.enable_starttls = not direct_tls
        self.enable_plaintext = False
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.auto_authorize = None
        self.auto_subscribe = False
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199", {"keepalive": False})
        self.register_plugin("xep_0203")
        if sm:
            self.register_plugin("xep_0198")
        self.messages: asyncio.Queue = asyncio.Queue()
        self.presences: asyncio.Queue = asyncio.Queue()
        self.roster_pushes: asyncio.Queue = asyncio.Queue()
        self.stream_errors: list[str] = []
        self.raw_in: list[str] = []
        self.raw_out: list[str] = []
        self.auth_failures: list[str] = []
        self.sessions_started = 0
        self._waiter: asyncio.Future | None = None
        self._gone = asyncio.Event()
        self.register_handler(Callback("test messages", MatchXPath("{jabber:client}message"),
                                       lambda m: self.messages.put_nowait(m)))
        self.register_handler(Callback("test presences", MatchXPath("{jabber:client}presence"),
                                       lambda p: self.presences.put_nowait(p)))
        self.add_event_handler("roster_update", lambda iq: self.roster_pushes.put_nowait(iq))
        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("failed_auth", self._on_failed_auth)
        self.add_event_handler("failed_all_auth", lambda _: self._fail("all SASL mechanisms failed"))
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("connection_failed", lambda e: self._fail(f"connection failed: {e}"))
        LIVE_CLIENTS.append(self)

    # -- raw traffic, for traces in assertion messages ----------------------

    def data_received(self, data: bytes) -> None:
        self.raw_in.append(data.decode("utf-8", errors="replace"))
        super().data_received(data)

    def send_raw(self, data) -> None:
        self.raw_out.append(data if isinstance(data, str) else data.decode("utf-8", errors="replace"))
        super().send_raw(data)

    def trace(self, limit: int = 4000) -> str:
        return ("OUT: " + "".join(self.raw_out)[-limit:] + "\nIN: " + "".join(self.raw_in)[-limit:])

    # -- events ---------------------------------------------------------------

    def _fail(self, why: str) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(LoginFailed(why))

    def _on_session_start(self, _event) -> None:
        self.sessions_started += 1
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    def _on_failed_auth(self, stanza) -> None:
        self.auth_failures.append(stanza["condition"] if stanza is not None else "?")
        self._fail(f"SASL failure: {self.auth_failures[-1]}")

    def _on_stream_error(self, err) -> None:
        self.stream_errors.append(err["condition"])
        self._fail(f"stream error: {err['condition']}")

    def _on_disconnected(self, _reason) -> None:
        self._gone.set()
        self._fail("disconnected")

    # -- actions --------------------------------------------------------------

    @property
    def sasl_mechanism(self) -> str | None:
        mech = self.plugin["feature_mechanisms"].mech
        return mech.name if mech is not None else None

    async def login(self, *, presence: bool = True, roster: bool = False, timeout: float = 10) -> "Client":
        """Connects, authenticates and binds; optionally fetches the roster and
        sends initial presence. Raises LoginFailed otherwise."""
        self._waiter = asyncio.get_running_loop().create_future()
        self._gone.clear()
        port = self.chatd.tls_port if self.direct_tls else self.chatd.c2s_port
        self.connect(self.chatd.host, port)
        try:
            await asyncio.wait_for(asyncio.shield(self._waiter), timeout)
        except asyncio.TimeoutError:
            self.abort()
            raise LoginFailed(f"no session within {timeout}s\n{self.trace()}")
        except LoginFailed:
            self.cancel_connection_attempt()
            raise
        finally:
            self._waiter = None
        if roster:
            await self.get_roster(timeout=timeout)
        if presence:
            self.send_presence()
            # The server handles a stream's stanzas in order: once the ping
            # is answered, this session is available for delivery.
            await self.ping_server(timeout=timeout)
        return self

    async def expect_login_failure(self, timeout: float = 10) -> str:
        try:
            await self.login(presence=False, timeout=timeout)
        except LoginFailed as e:
            self.cancel_connection_attempt()
            self.abort()
            return str(e)
        raise AssertionError(f"login unexpectedly succeeded\n{self.trace()}")

    async def close(self, timeout: float = 5) -> None:
        if self.transport is None:
            return
        self.disconnect(wait=timeout / 2)
        try:
            await asyncio.wait_for(self._gone.wait(), timeout)
        except asyncio.TimeoutError:
            self.abort()

    async def wait_disconnected(self, timeout: float = 10) -> None:
        try:
            await asyncio.wait_for(self._gone.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"still connected after {timeout}s\n{self.trace()}")

    @property
    def connected(self) -> bool:
        return self.transport is not None

    async def ping_server(self, timeout: float = 5) -> None:
        """Round trip to the server: everything sent before is processed."""
        await self["xep_0199"].send_ping(DOMAIN, timeout=timeout)

    def chat(self, to_phone_or_jid: str, body: str, *, mtype: str = "chat", msg_id: str | None = None):
        to = to_phone_or_jid if "@" in to_phone_or_jid else bare(to_phone_or_jid)
        m = self.make_message(mto=to, mbody=body, mtype=mtype)
        if msg_id:
            m["id"] = msg_id
        m.send()
        return m

    async def next_message(self, timeout: float = 5, *, skip_errors: bool = False):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                m = await asyncio.wait_for(self.messages.get(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise AssertionError(f"{self.boundjid}: no message within {timeout}s\n{self.trace()}")
            if skip_errors and m["type"] == "error":
                continue
            return m

    async def messages_for(self, seconds: float) -> list:
        """Everything received within `seconds` (and already queued)."""
        await asyncio.sleep(seconds)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    async def next_presence(self, timeout: float = 5, pred=None):
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            try:
                p = await asyncio.wait_for(self.presences.get(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise AssertionError(f"{self.boundjid}: no matching presence within {timeout}s; "
                                     f"others: {[str(x) for x in seen]}\n{self.trace()}")
            if pred is None or pred(p):
                return p
            seen.append(p)

    async def next_roster_push(self, timeout: float = 5, pred=None):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                iq = await asyncio.wait_for(self.roster_pushes.get(), max(left, 0.001))
            except asyncio.TimeoutError:
                raise AssertionError(f"{self.boundjid}: no matching roster push within {timeout}s\n{self.trace()}")
            if pred is None or pred(iq):
                return iq

    async def wait_sent(self, pattern: str, timeout: float = 5) -> re.Match:
        """Waits until the client has written something matching `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search("".join(self.raw_out))
            if m:
                return m
            await asyncio.sleep(0.02)
        raise AssertionError(f"{self.boundjid}: never sent /{pattern}/\n{self.trace()}")

    def sm_acks_sent(self) -> list[int]:
        return [int(h) for h in re.findall(r"<a xmlns=.urn:xmpp:sm:3. h=.(\d+).", "".join(self.raw_out))]


async def wait_acked(client: Client, at_least: int, timeout: float = 5) -> None:
    """Waits until an SM client has acknowledged `at_least` stanzas."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        acks = client.sm_acks_sent()
        if acks and max(acks) >= at_least:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{client.boundjid}: acked {client.sm_acks_sent()}, wanted {at_least}\n{client.trace()}")


async def wait_confirmed(client: Client, last_text: str, timeout: float = 5) -> str:
    """For a client without XEP-0198: waits until it has answered a server
    confirmation ping that arrived after `last_text`. Returns the ping id."""
    deadline = time.monotonic() + timeout
    ping_rx = re.compile(r"<iq\b[^>]*\bid=['\"](confirm\d+)['\"]")
    while time.monotonic() < deadline:
        rin = "".join(client.raw_in)
        at = rin.rfind(last_text)
        if at >= 0:
            for m in ping_rx.finditer(rin, at):
                answered = re.search(r"<iq\b[^>]*\bid=['\"]%s['\"][^>]*>|<iq\b[^>]*\bid=['\"]%s['\"][^>]*/>"
                                     % (m.group(1), m.group(1)), "".join(client.raw_out))
                if answered and "result" in answered.group(0):
                    return m.group(1)
        await asyncio.sleep(0.02)
    raise AssertionError(f"{client.boundjid}: no answered confirmation ping after {last_text!r}\n{client.trace()}")


def stanza_error(stanza) -> tuple[str | None, str | None]:
    """(condition, type) of a stanza's <error/>, from the XML itself."""
    err = stanza.xml.find("{jabber:client}error")
    if err is None:
        return None, None
    for child in err:
        if child.tag.startswith("{%s}" % STANZAS_NS) and not child.tag.endswith("}text"):
            return child.tag.split("}", 1)[1], err.get("type")
    return "?", err.get("type")


# --------------------------------------------------------------------------
# Raw socket client
# --------------------------------------------------------------------------


def client_ssl_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def stream_header(to: str = DOMAIN, *, prolog: str = "<?xml version='1.0'?>", extra: str = "") -> str:
    return (f"{prolog}<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
            f" to='{to}' version='1.0'{extra}>")


class RawClient:
    """A byte-level XMPP client with a regex-driven receive buffer."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.sent: list[str] = []
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")
        LIVE_CLIENTS.append(self)

    async def open(self, *, tls: bool = False, timeout: float = 5) -> "RawClient":
        kw = {"ssl": client_ssl_context(), "server_hostname": DOMAIN} if tls else {}
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 22, **kw), timeout)
        return self

    def send(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.sent.append(data)
            data = data.encode()
        else:
            self.sent.append(data.decode(errors="replace"))
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def _read_some(self, timeout: float) -> bool:
        """Reads one chunk; False on EOF."""
        if self.eof:
            return False
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            data = b""
        if not data:
            self.eof = True
            self.buf += self._dec.decode(b"", final=True)
            return False
        self.buf += self._dec.decode(data)
        return True

    @property
    def unread(self) -> str:
        return self.buf[self.pos:]

    def trace(self) -> str:
        return f"SENT: {''.join(self.sent)[-2000:]}\nRECEIVED: {self.buf[-3000:]}"

    async def expect(self, pattern: str, timeout: float = 5, flags=re.S) -> re.Match:
        """Consumes input up to the first match of `pattern`."""
        rx = re.compile(pattern, flags)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timeout waiting for /{pattern}/\n{self.trace()}")
            try:
                more = await self._read_some(left)
            except asyncio.TimeoutError:
                continue
            if not more:
                m = rx.search(self.buf, self.pos)
                if m:
                    self.pos = m.end()
                    return m
                raise AssertionError(f"connection closed while waiting for /{pattern}/\n{self.trace()}")

    async def silent_for(self, seconds: float) -> str:
        """Reads for `seconds`; returns what arrived (the caller checks it)."""
        deadline = time.monotonic() + seconds
        start = len(self.buf)
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await self._read_some(left)
            except asyncio.TimeoutError:
                break
        return self.buf[start:]

    async def read_to_eof(self, timeout: float = 5) -> str:
        """Reads until the server closes; returns the unread input."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"server did not close the connection within {timeout}s\n{self.trace()}")
            try:
                await self._read_some(left)
            except asyncio.TimeoutError:
                continue
        out = self.buf[self.pos:]
        self.pos = len(self.buf)
        return out

    async def expect_stream_error(self, condition: str, timeout: float = 5) -> str:
        """Asserts the stream ends with <stream:error><condition/>, the stream
        close tag and a TCP close. Returns the tail received."""
        tail = await self.read_to_eof(timeout)
        m = re.search(r"<stream:error>\s*<([a-z-]+)\s+xmlns=['\"]%s['\"]" % re.escape(STREAMS_NS), tail)
        assert m, f"no stream error (wanted {condition})\n{self.trace()}"
        assert m.group(1) == condition, f"stream error {m.group(1)}, wanted {condition}\n{self.trace()}"
        assert tail.rstrip().endswith("</stream:stream>"), f"no </stream:stream> after the error\n{self.trace()}"
        return tail

    # -- negotiation ---------------------------------------------------------------

    async def open_stream(self, to: str = DOMAIN) -> str:
        """Sends a header; returns the <stream:features/> received."""
        self.send(stream_header(to))
        await self.expect(r"<stream:stream\b[^>]*>")
        return (await self.expect(r"<stream:features\b.*?(</stream:features>|<stream:features/>)")).group(0)

    async def starttls(self) -> None:
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await self.expect(r"<proceed\b[^>]*/>")
        await asyncio.wait_for(self.writer.start_tls(client_ssl_context(), server_hostname=DOMAIN), 5)

    async def auth_plain(self, local: str, password: str) -> str:
        token = base64.b64encode(f"\0{local}\0{password}".encode()).decode()
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
        return (await self.expect(r"<success\b[^>]*(/>|>.*?</success>)|<failure\b.*?</failure>")).group(0)

    async def bind(self, resource: str) -> str:
        self.send(f"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  f"<resource>{resource}</resource></bind></iq>")
        m = await self.expect(r"<iq\b[^>]*id=['\"]bind1['\"].*?(</iq>|/>)")
        jid = re.search(r"<jid>([^<]+)</jid>", m.group(0))
        assert jid, f"bind failed: {m.group(0)}"
        return jid.group(1)

    async def login(self, phone: str, password: str = PASSWORD, *, resource: str = "raw",
                    starttls: bool = True, direct_tls: bool = False) -> str:
        """Negotiates up to a bound resource. Returns the full JID."""
        if self.writer is None:
            await self.open(tls=direct_tls)
        feats = await self.open_stream()
        if starttls and not direct_tls:
            assert "<starttls" in feats, feats
            await self.starttls()
            feats = await self.open_stream()
        assert ">PLAIN<" in feats, f"PLAIN not offered: {feats}"
        res = await self.auth_plain(local_of(phone), password)
        assert res.startswith("<success"), f"auth failed: {res}"
        await self.open_stream()
        return await self.bind(resource)

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.transport.abort()
            except Exception:
                pass

    async def close(self) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 2)
            except Exception:
                pass
