/**
 * Framing only: newline-delimited JSON (one JSON-RPC message per line), no knowledge of methods.
 *
 * Lines are cut on the byte 0x0A before any decoding, so a UTF-8 character split across two
 * chunks is reassembled before it is decoded, and U+2028/U+2029 inside strings never end a
 * message. A trailing CR (CRLF line ends) is dropped; blank lines are skipped.
 */

const LF = 0x0a;
const CR = 0x0d;

/** Default cap on one incoming message: large enough for any result, small enough to fail fast. */
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/** A line grew past the cap before its newline arrived. The buffer drops that line and goes on. */
export class MessageTooLargeError extends Error {
  override name = "MessageTooLargeError";
  constructor(
    readonly limit: number,
    readonly received: number,
  ) {
    super(`Incoming message exceeds ${limit} bytes (at least ${received} bytes without a newline)`);
  }
}

/** A complete line that is not valid JSON. The line is consumed; later lines are unaffected. */
export class MessageParseError extends Error {
  override name = "MessageParseError";
  constructor(
    readonly line: string,
    cause: unknown,
  ) {
    super(`Invalid JSON from sidecar: ${truncate(line, 200)}`, { cause });
  }
}

/**
 * Accumulates stdout chunks and yields whole messages.
 *
 * `append()` never throws for content; `readMessage()` returns the next parsed message,
 * `undefined` when no complete line is buffered, and throws `MessageParseError` /
 * `MessageTooLargeError` for a bad line (the bad line is already consumed, so calling again
 * continues with the next one).
 */
export class ReadBuffer {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** Chunks before this index are known to contain no LF, so they are not scanned again. */
  private scannedChunks = 0;
  /** After an oversized line: drop bytes until the next LF. */
  private skipping = false;

  constructor(readonly maxMessageBytes: number = DEFAULT_MAX_MESSAGE_BYTES) {}

  append(chunk: Buffer): void {
    if (this.skipping) {
      const nl = chunk.indexOf(LF);
      if (nl === -1) return;
      this.skipping = false;
      chunk = chunk.subarray(nl + 1);
    }
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
  }

  /** Bytes held that are not yet part of a complete message. */
  get size(): number {
    return this.buffered;
  }

  readMessage(): unknown {
    for (;;) {
      const line = this.nextLine();
      if (line === undefined) return undefined;
      let end = line.length;
      if (end > 0 && line[end - 1] === CR) end--;
      const text = line.toString("utf8", 0, end);
      if (text.trim() === "") continue;
      try {
        return JSON.parse(text);
      } catch (err) {
        throw new MessageParseError(text, err);
      }
    }
  }

  clear(): void {
    this.chunks = [];
    this.buffered = 0;
    this.scannedChunks = 0;
    this.skipping = false;
  }

  private nextLine(): Buffer | undefined {
    for (let i = this.scannedChunks; i < this.chunks.length; i++) {
      const chunk = this.chunks[i]!;
      const nl = chunk.indexOf(LF);
      if (nl === -1) continue;
      const parts = this.chunks.slice(0, i);
      parts.push(chunk.subarray(0, nl));
      const lineBytes = parts.reduce((n, b) => n + b.length, 0);
      const rest = chunk.subarray(nl + 1);
      this.chunks = rest.length ? [rest, ...this.chunks.slice(i + 1)] : this.chunks.slice(i + 1);
      this.buffered -= lineBytes + 1;
      this.scannedChunks = 0;
      if (lineBytes > this.maxMessageBytes) throw new MessageTooLargeError(this.maxMessageBytes, lineBytes);
      return parts.length === 1 ? parts[0]! : Buffer.concat(parts, lineBytes);
    }
    this.scannedChunks = this.chunks.length;
    if (this.buffered > this.maxMessageBytes) {
      const received = this.buffered;
      this.clear();
      this.skipping = true;
      throw new MessageTooLargeError(this.maxMessageBytes, received);
    }
    return undefined;
  }
}

/**
 * One message as one line. U+2028/U+2029 are escaped: JSON.stringify leaves them raw, and a
 * reader that splits on Unicode line separators (Python's str.splitlines) would cut the message.
 */
export function serializeMessage(message: unknown): string {
  return JSON.stringify(message).replace(/[\u2028\u2029]/g, (c) => (c === "\u2028" ? "\\u2028" : "\\u2029")) + "\n";
}

function truncate(s: string, n: number): string {
  return s.length <= n ? s : `${s.slice(0, n)}… (${s.length} chars)`;
}
