/**
 * The child process and its pipes: spawn, write with backpressure, read framed messages, drain
 * stderr, and stop the process with escalation. Knows nothing about JSON-RPC semantics.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { StringDecoder } from "node:string_decoder";

import type { ExitInfo } from "./errors.js";
import { ReadBuffer, serializeMessage } from "./framing.js";
import { killGroup, registerGroup, unregisterGroup } from "./reaper.js";

export interface TransportOptions {
  command: string;
  args: readonly string[];
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  maxMessageBytes?: number;
  /** Bytes of stderr kept for error messages (the tail). Default 64 KiB. */
  stderrBufferBytes?: number;
  /** Kill the child's process group when this process exits. Default true. */
  killOnParentExit?: boolean;
}

export interface CloseOptions {
  /** After stdin is closed, how long the process gets to exit by itself. */
  graceMs?: number;
  /** After SIGTERM, how long before SIGKILL. */
  termMs?: number;
}

/** After 'exit', how long to wait for the pipes to close so a last answer is still read. */
const PIPE_CLOSE_WAIT_MS = 250;
/** One stderr line longer than this is passed on in pieces (keeps the line buffer bounded). */
const MAX_STDERR_LINE = 16 * 1024;

/** Keeps the last `capacity` characters written to it. */
export class RingBuffer {
  private text = "";
  constructor(readonly capacity: number) {}
  push(s: string): void {
    this.text += s;
    // Trim lazily (at twice the capacity) so appends stay amortised O(1).
    if (this.text.length > this.capacity * 2) this.text = this.text.slice(-this.capacity);
  }
  toString(): string {
    return this.text.length > this.capacity ? this.text.slice(-this.capacity) : this.text;
  }
  clear(): void {
    this.text = "";
  }
}

export class StdioTransport {
  onmessage?: (message: unknown) => void;
  /** A framing or pipe problem that does not by itself end the connection. */
  onerror?: (error: Error) => void;
  onstderr?: (line: string) => void;
  /** Called exactly once, after the process is gone (or failed to start). */
  onclose?: (info: ExitInfo) => void;

  private child: ChildProcess | undefined;
  private started = false;
  private finished = false;
  private exitInfo: ExitInfo | undefined;
  private readonly readBuffer: ReadBuffer;
  private readonly stderr: RingBuffer;
  private stderrLine = "";
  private readonly stderrDecoder = new StringDecoder("utf8");
  private readonly closedWaiters: Array<(info: ExitInfo) => void> = [];

  constructor(private readonly options: TransportOptions) {
    this.readBuffer = new ReadBuffer(options.maxMessageBytes);
    this.stderr = new RingBuffer(options.stderrBufferBytes ?? 64 * 1024);
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** True from a successful start until the process is gone. */
  get alive(): boolean {
    return this.started && !this.finished && this.child?.pid !== undefined;
  }

  stderrTail(): string {
    return this.stderr.toString();
  }

  /** Spawn the process. Resolves once it runs; rejects if it cannot be started. */
  start(): Promise<void> {
    if (this.started) throw new Error("StdioTransport already started; create a new one to restart");
    this.started = true;
    const { command, args, cwd, env } = this.options;
    return new Promise<void>((resolve, reject) => {
      let child: ChildProcess;
      try {
        child = spawn(command, args, { cwd, env, stdio: ["pipe", "pipe", "pipe"], detached: true, windowsHide: true });
      } catch (err) {
        this.finish({ code: null, signal: null, stderrTail: "", spawnError: err as Error });
        reject(err);
        return;
      }
      this.child = child;
      let spawned = false;

      child.once("spawn", () => {
        spawned = true;
        if (child.pid !== undefined && this.options.killOnParentExit !== false) registerGroup(child.pid);
        resolve();
      });
      child.on("error", (err) => {
        if (!spawned) {
          this.finish({ code: null, signal: null, stderrTail: this.stderrTail(), spawnError: err });
          reject(err);
        } else {
          this.onerror?.(err);
        }
      });

      child.stdout!.on("data", (chunk: Buffer) => this.onStdout(chunk));
      child.stderr!.on("data", (chunk: Buffer) => this.onStderr(chunk));
      // EPIPE when the child is gone: the 'exit' handling reports it; never crash the parent.
      child.stdin!.on("error", (err) => this.onerror?.(err));
      child.stdout!.on("error", (err) => this.onerror?.(err));
      child.stderr!.on("error", (err) => this.onerror?.(err));

      child.once("exit", (code, signal) => {
        // Reap whatever the sidecar left behind in its group (the leader is already gone).
        if (child.pid !== undefined) killGroup(child.pid, "SIGKILL");
        const timer = setTimeout(() => this.finishFromChild(code, signal), PIPE_CLOSE_WAIT_MS);
        child.once("close", () => {
          clearTimeout(timer);
          this.finishFromChild(code, signal);
        });
      });
    });
  }

  /** Write one message; waits for 'drain' when the pipe is full. */
  send(message: unknown): Promise<void> {
    const stdin = this.child?.stdin;
    if (!this.alive || !stdin || !stdin.writable) return Promise.reject(new Error("Sidecar stdin is not writable"));
    const data = serializeMessage(message);
    return new Promise<void>((resolve, reject) => {
      const ok = stdin.write(data, (err) => (err ? reject(err) : undefined));
      if (ok) {
        resolve();
        return;
      }
      const done = () => {
        stdin.off("drain", done);
        stdin.off("close", done);
        resolve();
      };
      stdin.on("drain", done);
      stdin.on("close", done);
    });
  }

  /** Close stdin (EOF tells the sidecar to exit). */
  endInput(): void {
    const stdin = this.child?.stdin;
    if (stdin && !stdin.destroyed) stdin.end();
  }

  /** Signal the whole process group. */
  kill(signal: NodeJS.Signals = "SIGTERM"): boolean {
    const pid = this.child?.pid;
    if (pid === undefined || this.finished) return false;
    return killGroup(pid, signal);
  }

  /** Resolves when the process is gone (immediately if it already is). */
  closed(): Promise<ExitInfo> {
    if (this.exitInfo) return Promise.resolve(this.exitInfo);
    return new Promise((resolve) => this.closedWaiters.push(resolve));
  }

  /**
   * Stop the process: close stdin, wait `graceMs`; SIGTERM the group, wait `termMs`; SIGKILL.
   * Resolves with how it ended.
   */
  async close({ graceMs = 2000, termMs = 2000 }: CloseOptions = {}): Promise<ExitInfo> {
    if (this.exitInfo) return this.exitInfo;
    if (!this.started || !this.child) {
      this.finish({ code: null, signal: null, stderrTail: "" });
      return this.exitInfo!;
    }
    this.endInput();
    if (await this.waitClosed(graceMs)) return this.exitInfo!;
    this.kill("SIGTERM");
    if (await this.waitClosed(termMs)) return this.exitInfo!;
    this.kill("SIGKILL");
    return this.closed();
  }

  /** Keep (or stop keeping) the Node event loop alive because of this child. */
  setRef(ref: boolean): void {
    const child = this.child;
    if (!child) return;
    for (const s of [child.stdin, child.stdout, child.stderr] as unknown as Array<{ ref?(): void; unref?(): void } | null>) {
      if (ref) s?.ref?.();
      else s?.unref?.();
    }
    if (ref) child.ref();
    else child.unref();
  }

  private waitClosed(ms: number): Promise<boolean> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      void this.closed().then(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  private onStdout(chunk: Buffer): void {
    this.readBuffer.append(chunk);
    for (;;) {
      let message: unknown;
      try {
        message = this.readBuffer.readMessage();
      } catch (err) {
        this.onerror?.(err as Error);
        continue;
      }
      if (message === undefined) return;
      this.onmessage?.(message);
    }
  }

  private onStderr(chunk: Buffer): void {
    const text = this.stderrDecoder.write(chunk);
    this.stderr.push(text);
    if (!this.onstderr) return;
    this.stderrLine += text;
    let nl: number;
    while ((nl = this.stderrLine.indexOf("\n")) !== -1) {
      this.emitStderrLine(this.stderrLine.slice(0, nl));
      this.stderrLine = this.stderrLine.slice(nl + 1);
    }
    while (this.stderrLine.length > MAX_STDERR_LINE) {
      this.emitStderrLine(this.stderrLine.slice(0, MAX_STDERR_LINE));
      this.stderrLine = this.stderrLine.slice(MAX_STDERR_LINE);
    }
  }

  private emitStderrLine(line: string): void {
    try {
      this.onstderr?.(line.endsWith("\r") ? line.slice(0, -1) : line);
    } catch (err) {
      this.onerror?.(err as Error);
    }
  }

  private finishFromChild(code: number | null, signal: NodeJS.Signals | null): void {
    const rest = this.stderrDecoder.end();
    if (rest) this.stderr.push(rest);
    if (this.stderrLine) {
      this.emitStderrLine(this.stderrLine);
      this.stderrLine = "";
    }
    this.finish({ code, signal, stderrTail: this.stderrTail() });
  }

  private finish(info: ExitInfo): void {
    if (this.finished) return;
    this.finished = true;
    this.exitInfo = info;
    if (this.child?.pid !== undefined) unregisterGroup(this.child.pid);
    this.readBuffer.clear();
    // Drop our pipe handles so nothing keeps the event loop alive after the child is gone.
    this.child?.stdin?.destroy();
    this.child?.stdout?.destroy();
    this.child?.stderr?.destroy();
    for (const w of this.closedWaiters.splice(0)) w(info);
    this.onclose?.(info);
  }
}
