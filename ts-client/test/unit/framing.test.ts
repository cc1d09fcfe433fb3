import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { MessageParseError, MessageTooLargeError, ReadBuffer, serializeMessage } from "../../src/framing.js";

function drain(buf: ReadBuffer): unknown[] {
  const out: unknown[] = [];
  for (let m = buf.readMessage(); m !== undefined; m = buf.readMessage()) out.push(m);
  return out;
}

describe("ReadBuffer", () => {
  it("reassembles a UTF-8 character split across chunks, at every split point", () => {
    const message = { text: "héllo – 日本語 😀 done" };
    const bytes = Buffer.from(JSON.stringify(message) + "\n", "utf8");
    for (let cut = 1; cut < bytes.length; cut++) {
      const buf = new ReadBuffer();
      buf.append(bytes.subarray(0, cut));
      assert.equal(buf.readMessage(), undefined, `no message before the newline (cut ${cut})`);
      buf.append(bytes.subarray(cut));
      assert.deepEqual(drain(buf), [message], `cut at byte ${cut}`);
    }
  });

  it("delivers byte-by-byte input", () => {
    const bytes = Buffer.from('{"a":"😀"}\n{"b":2}\n', "utf8");
    const buf = new ReadBuffer();
    const out: unknown[] = [];
    for (const b of bytes) {
      buf.append(Buffer.from([b]));
      out.push(...drain(buf));
    }
    assert.deepEqual(out, [{ a: "😀" }, { b: 2 }]);
  });

  it("accepts CRLF line ends and skips blank lines", () => {
    const buf = new ReadBuffer();
    buf.append(Buffer.from('{"id":1}\r\n\r\n\n{"id":2}\r\n'));
    assert.deepEqual(drain(buf), [{ id: 1 }, { id: 2 }]);
  });

  it("keeps raw U+2028/U+2029 inside strings as content, not line ends", () => {
    const buf = new ReadBuffer();
    buf.append(Buffer.from('{"s":"a\u2028b\u2029c"}\n', "utf8"));
    assert.deepEqual(drain(buf), [{ s: "a\u2028b\u2029c" }]);
  });

  it("several messages in one chunk, and a partial one kept for later", () => {
    const buf = new ReadBuffer();
    buf.append(Buffer.from('{"n":1}\n{"n":2}\n{"n":'));
    assert.deepEqual(drain(buf), [{ n: 1 }, { n: 2 }]);
    assert.equal(buf.size, 5);
    buf.append(Buffer.from("3}\n"));
    assert.deepEqual(drain(buf), [{ n: 3 }]);
    assert.equal(buf.size, 0);
  });

  it("reports a bad line and goes on with the next", () => {
    const buf = new ReadBuffer();
    buf.append(Buffer.from('not json\n{"ok":true}\n'));
    assert.throws(() => buf.readMessage(), MessageParseError);
    assert.deepEqual(drain(buf), [{ ok: true }]);
  });

  it("caps a line that never ends, drops it, and recovers at the next newline", () => {
    const buf = new ReadBuffer(1024);
    buf.append(Buffer.alloc(600, 0x61));
    assert.equal(buf.readMessage(), undefined);
    buf.append(Buffer.alloc(600, 0x61));
    assert.throws(() => buf.readMessage(), (e: unknown) => e instanceof MessageTooLargeError && e.limit === 1024);
    assert.equal(buf.size, 0, "the oversized bytes are released");
    buf.append(Buffer.alloc(5000, 0x61)); // still the same oversized line: ignored
    assert.equal(buf.size, 0);
    buf.append(Buffer.from('aaa\n{"after":1}\n'));
    assert.deepEqual(drain(buf), [{ after: 1 }]);
  });

  it("caps a complete line that arrived in one chunk", () => {
    const buf = new ReadBuffer(16);
    buf.append(Buffer.from(`{"long":"${"x".repeat(40)}"}\n{"short":1}\n`));
    assert.throws(() => buf.readMessage(), MessageTooLargeError);
    assert.deepEqual(drain(buf), [{ short: 1 }]);
  });

  it("handles a large message arriving in many chunks, touching each byte a bounded number of times (no quadratic rescans or copies)", () => {
    const big = { data: "y".repeat(8 * 1024 * 1024) };
    const bytes = Buffer.from(JSON.stringify(big) + "\n");
    const chunkSize = 16 * 1024;
    const buf = new ReadBuffer();
    // Count the bytes the buffer scans for the newline and copies, instead of timing it: a
    // quadratic buffer does ~260x the work on these 513 chunks whatever the machine's load.
    let scanned = 0;
    let copied = 0;
    const proto = Buffer.prototype as unknown as Record<string, (...a: unknown[]) => unknown>;
    const originals = { indexOf: proto["indexOf"]!, includes: proto["includes"]!, lastIndexOf: proto["lastIndexOf"]!, copy: proto["copy"]! };
    const concat = Buffer.concat;
    const u8set = Uint8Array.prototype.set;
    for (const name of ["indexOf", "includes", "lastIndexOf"] as const) {
      proto[name] = function (this: Buffer, ...a: unknown[]) {
        scanned += this.length;
        return originals[name].apply(this, a);
      };
    }
    proto["copy"] = function (this: Buffer, ...a: unknown[]) {
      copied += this.length;
      return originals.copy.apply(this, a);
    };
    Buffer.concat = (list: readonly Uint8Array[], total?: number) => {
      copied += total ?? list.reduce((n, b) => n + b.length, 0);
      return concat(list, total);
    };
    Uint8Array.prototype.set = function (this: Uint8Array, src: ArrayLike<number>, offset?: number) {
      copied += src.length;
      return u8set.call(this, src, offset);
    };
    let messages: unknown[];
    try {
      for (let i = 0; i < bytes.length; i += chunkSize) {
        buf.append(bytes.subarray(i, i + chunkSize));
        if (i + chunkSize < bytes.length) assert.equal(buf.readMessage(), undefined);
      }
      messages = drain(buf);
    } finally {
      Object.assign(proto, originals);
      Buffer.concat = concat;
      Uint8Array.prototype.set = u8set;
    }
    assert.deepEqual(messages, [big]);
    // Linear: each chunk scanned once (plus the last one again by drain), the line copied once.
    assert.ok(scanned <= 2 * bytes.length, `scanned ${scanned} bytes for a ${bytes.length}-byte message`);
    assert.ok(copied <= 2 * bytes.length, `copied ${copied} bytes for a ${bytes.length}-byte message`);
    assert.ok(scanned >= bytes.length, `the counter sees the scans (${scanned})`);
  });
});

describe("serializeMessage", () => {
  it("writes one line, escaping U+2028/U+2029 so no reader can split the message", () => {
    const line = serializeMessage({ s: "a\u2028b\u2029c\nd" });
    assert.ok(line.endsWith("\n"));
    assert.equal(line.indexOf("\n"), line.length - 1, "the only newline is the terminator");
    assert.ok(!line.includes("\u2028") && !line.includes("\u2029"));
    assert.deepEqual(JSON.parse(line), { s: "a\u2028b\u2029c\nd" });
    const buf = new ReadBuffer();
    buf.append(Buffer.from(line));
    assert.deepEqual(drain(buf), [{ s: "a\u2028b\u2029c\nd" }]);
  });
});
