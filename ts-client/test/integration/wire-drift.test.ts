/** Types stay true: src/wire.ts must be exactly what the live sidecar's schema generates. */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";

import { fetchSchema, generateWireTs, wireTsPath, type ProtocolSchema } from "../../scripts/gen-wire.js";
import { repoRoot, requireEnvironment } from "./helpers.js";

describe("wire types", () => {
  let schema: ProtocolSchema;

  it("src/wire.ts matches the schema `train-wrapper.sh -m sidecar schema` prints (run `npm run gen:types` if not)", () => {
    requireEnvironment();
    schema = fetchSchema(repoRoot);
    const committed = readFileSync(wireTsPath(), "utf8");
    assert.equal(committed, generateWireTs(schema), "src/wire.ts is stale: run `npm --prefix ts-client run gen:types`");
  });

  it("the check can fail: a changed field type or a new field changes the output", () => {
    assert.ok(schema, "needs the live schema");
    const base = generateWireTs(schema);
    const changed = structuredClone(schema);
    changed.$defs["TrainParams"]!.properties!["rank"] = { type: "string" };
    assert.notEqual(generateWireTs(changed), base);
    const added = structuredClone(schema);
    added.$defs["Progress"]!.properties!["newField"] = { type: "number" };
    const text = generateWireTs(added);
    assert.match(text, /newField: number;/, "output types mark every field as present");
  });

  it("params fields with defaults are optional; result fields are always present", () => {
    const text = generateWireTs(schema);
    const block = (name: string) => text.slice(text.indexOf(`export interface ${name} {`), text.indexOf("\n}\n", text.indexOf(`export interface ${name} {`)));
    assert.match(block("TrainParams"), /\n {2}rank\?: number;/);
    assert.match(block("TrainResult"), /\n {2}warnings: string\[\];/);
    assert.match(block("TrainMetrics"), /\n {2}validationLoss: number \| null;/);
    assert.match(text, /train: \{ params: TrainParams; result: TrainResult \};/);
  });
});
