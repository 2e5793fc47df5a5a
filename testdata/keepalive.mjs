// Feeds broker-client 0.0.8's chunk parser a frame, then the keep-alive given as the first
// argument (JSON-encoded bytes), then the next frame, in one read and in separate reads,
// and prints the messages it would dispatch, one JSON line each.
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const pkg = join(dirname(fileURLToPath(import.meta.url)), 'node_modules', 'broker-client');
const dir = mkdtempSync(join(tmpdir(), 'broker-client-'));
writeFileSync(join(dir, 'utils.mjs'), readFileSync(join(pkg, 'utils.js')));
const { parseChunkToStringEvent, parseStringEventToObject } = await import(join(dir, 'utils.mjs'));

const keepAlive = JSON.parse(process.argv[2]);
const frame = (id) => `event:news\nid:${id}\ndata:{"n":${id}}\n\n`;
const bytes = (s) => new TextEncoder().encode(s);
for (const reads of [[frame(1) + keepAlive + frame(2)], [frame(1), keepAlive, frame(2)], [frame(1) + keepAlive, frame(2)]]) {
  let queue = [{ message: '', complete: false }];
  const out = [];
  for (const r of reads) {
    queue = parseChunkToStringEvent(bytes(r), queue.filter((m) => !m.complete));
    out.push(...queue.filter((m) => m.complete).map((m) => parseStringEventToObject(m.message)));
  }
  console.log(JSON.stringify(out.map((o) => [o.event, o.id, o.data])));
}
