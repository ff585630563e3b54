// Client-matrix driver on @xmpp/client (xmpp.js). Same command line and
// JSON-lines output as ../slixmpp_client.py. The server's certificate is
// self-signed: run with NODE_TLS_REJECT_UNAUTHORIZED=0.
import { client, xml } from "@xmpp/client";
import { parseArgs } from "node:util";

// `--send TO BODY` takes two values, which parseArgs cannot express.
const argv = process.argv.slice(2);
let send;
const si = argv.indexOf("--send");
if (si >= 0) send = argv.splice(si, 3).slice(1);

const { values: a } = parseArgs({
  args: argv,
  options: {
    port: { type: "string" },
    "direct-tls": { type: "boolean", default: false },
    jid: { type: "string" },
    password: { type: "string" },
    repeat: { type: "string", default: "0" },
    id: { type: "string", default: "m1" },
    "wait-receipt": { type: "boolean", default: false },
    until: { type: "string" },
    timeout: { type: "string", default: "15" },
  },
});

const emit = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const timeoutMs = Number(a.timeout) * 1000;
const [username, domain] = a.jid.split("@");
const version = JSON.parse(
  await (await import("node:fs/promises")).readFile(
    new URL("./node_modules/@xmpp/client/package.json", import.meta.url),
  ),
).version;

function withTimeout(p, what) {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Error(`timeout: ${what}`)), timeoutMs);
    }),
  ]);
}

/** Logs in; with `echo`, resolves once our initial presence is echoed. */
async function login(echo_wanted = true) {
  const scheme = a["direct-tls"] ? "xmpps" : "xmpp";
  const x = client({ service: `${scheme}://127.0.0.1:${a.port}`, domain, username, password: a.password });
  x.on("error", () => {});
  const queue = [];
  const waiters = [];
  let echoed;
  const echo = new Promise((r) => (echoed = r));
  x.on("stanza", (st) => {
    if (st.is("presence") && !st.attrs.type && x.jid && st.attrs.from === x.jid.toString()) echoed();
    if (!st.is("message")) return;
    const rec = st.getChild("received", "urn:xmpp:receipts");
    const body = st.getChildText("body");
    const ev = rec ? { kind: "receipt", id: rec.attrs.id } : null;
    if (body) {
      if (st.getChild("request", "urn:xmpp:receipts") && st.attrs.id) {
        x.send(
          xml("message", { to: st.attrs.from, type: "chat" }, xml("received", { xmlns: "urn:xmpp:receipts", id: st.attrs.id })),
        );
      }
      const d = st.getChild("delay", "urn:xmpp:delay");
      const from = st.attrs.from.split("/")[0];
      queue.push({ kind: "message", from, body, delay: d ? d.attrs.stamp : null });
    } else if (ev) {
      queue.push(ev);
    }
    while (waiters.length && queue.length) waiters.shift()(queue.shift());
  });
  x.next = (kind) =>
    withTimeout(
      new Promise((resolve) => {
        const take = (ev) => (ev.kind === kind ? resolve(ev) : waiters.unshift(take));
        const i = queue.findIndex((e) => e.kind === kind);
        if (i >= 0) resolve(queue.splice(i, 1)[0]);
        else waiters.push(take);
      }),
      kind,
    );
  x.on("online", () => x.send(xml("presence")));
  await withTimeout(x.start(), "login");
  if (echo_wanted) await withTimeout(echo, "presence echo");
  return x;
}

async function stop(x) {
  try {
    await withTimeout(x.stop(), "stop");
  } catch {}
}

async function main() {
  if (Number(a.repeat) > 0) {
    let ok = 0;
    const errors = {};
    for (let i = 0; i < Number(a.repeat); i++) {
      try {
        const x = await login(false);
        ok++;
        await stop(x);
      } catch (e) {
        errors[e.message] = (errors[e.message] || 0) + 1;
      }
    }
    emit({ event: "logins", ok, total: Number(a.repeat), errors });
    return 0;
  }
  let x;
  try {
    x = await login();
  } catch (e) {
    emit({ event: "login_failed", detail: String(e) });
    return 1;
  }
  emit({ event: "online", jid: x.jid.toString(), mechanism: null, version });
  if (send) {
    const [to, body] = send;
    await x.send(
      xml("message", { to, type: "chat", id: a.id }, xml("body", {}, body), xml("request", { xmlns: "urn:xmpp:receipts" })),
    );
    emit({ event: "sent", id: a.id });
    if (a["wait-receipt"]) {
      try {
        const r = await x.next("receipt");
        emit({ event: "receipt", id: r.id });
      } catch {
        emit({ event: "no_receipt" });
      }
    }
  }
  while (a.until !== undefined) {
    let m;
    try {
      m = await x.next("message");
    } catch {
      emit({ event: "timeout" });
      break;
    }
    emit({ event: "message", from: m.from, body: m.body, delay: m.delay });
    if (m.body === a.until) break;
  }
  await new Promise((r) => setTimeout(r, 300));
  await stop(x);
  emit({ event: "done" });
  return 0;
}

process.exit(await main());
