// Messages between the page (index.ts) and the SDK's Web Worker (worker.ts).

/** Where the signed targets metadata comes from, and what it must be signed by. */
export type Trust =
  | { kind: "keys"; publicKeys: string[]; threshold: number }
  | { kind: "root"; root: string };

/** How the worker reaches capsules: a static directory, or a hub. */
export type Source =
  | { kind: "url"; base: string; targets: string }
  | { kind: "hub"; hub: string; token: string; nodeId: string; labels: Record<string, string> };

export interface WireTensor {
  name: string;
  datatype: string;
  shape: number[];
  /** Packed little-endian elements (BYTES: 4-byte length + bytes per element). Sent to a
   * worker, it owns its whole buffer (which is transferred). */
  data: Uint8Array;
}

export interface Loaded {
  handle: number;
  name: string;
  version: string;
  sha256: string;
  manifest: unknown;
  fromCache: boolean;
  bytes: number;
  timings: LoadTimings;
}

/** Where a load's time went, in milliseconds. */
export interface LoadTimings {
  /** Signed metadata: download (or the hub's assignment) and verification. */
  metadataMs: number;
  /** The capsule's bytes from the network or Cache Storage (compilation streams meanwhile). */
  downloadMs: number;
  /** Length and SHA-256 against the signed target. */
  verifyMs: number;
  /** What compilation still took after the bytes verified. */
  compileMs: number;
  /** Instantiation and the guest's model initialization. */
  instantiateMs: number;
}

export type Request =
  | { op: "init"; source: Source; trust: Trust; cacheName: string; telemetryWindowMs: number }
  | { op: "load"; model: string; version?: string }
  | { op: "infer"; handle: number; inputs: WireTensor[]; id: string }
  | { op: "dispose"; handle: number }
  | { op: "feedback"; model: string; id: string; label: string }
  | { op: "flush" }
  | { op: "close" };

export interface ErrorInfo {
  name: string;
  message: string;
}

export type Response =
  | { id: number; ok: true; result: unknown }
  | { id: number; ok: false; error: ErrorInfo };
