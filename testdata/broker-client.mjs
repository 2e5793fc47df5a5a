// Drives the published broker-client 0.0.8 against a running broker:
//   node testdata/broker-client.mjs <broker URL> <jwt>
// prints "<event> <id> <data re-serialised>" for the events "synced" and "live", then exits;
// an onmessage that parses every message as JSON makes it crash on anything else.
// broker-client ships ES-module syntax in .js files and imports './utils' without an
// extension, which bundlers resolve and Node does not; its two files are copied as .mjs
// with that one specifier completed, unchanged otherwise.
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const [url, jwt] = process.argv.slice(2);
const pkg = join(dirname(fileURLToPath(import.meta.url)), 'node_modules', 'broker-client');
const dir = mkdtempSync(join(tmpdir(), 'broker-client-'));
writeFileSync(join(dir, 'utils.mjs'), readFileSync(join(pkg, 'utils.js')));
writeFileSync(join(dir, 'index.mjs'), readFileSync(join(pkg, 'index.js'), 'utf8').replace("from './utils'", "from './utils.mjs'"));
const { default: BrokerClient } = await import(join(dir, 'index.mjs'));

const client = new BrokerClient(url + '/sse', { headers: { authorization: 'Bearer ' + jwt } });
// As applications do: every message must be JSON, keep-alives included if they arrive here.
client.onmessage = (e) => JSON.parse(e.data);
const print = (e) => console.log(`${e.type} ${e.lastEventId} ${JSON.stringify(JSON.parse(e.data))}`);
client.addEventListener('synced', print);
client.addEventListener('live', (e) => {
  print(e);
  client.close();
  process.exit(0);
});
setTimeout(() => { console.error('timed out'); process.exit(1); }, 30000);
