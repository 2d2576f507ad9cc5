// js-libp2p peer for dbloom interop tests. One JSON object per line on stdout; logs on stderr.
//   node peer.mjs listen [--echo-protocol P] [--identify-push] [--no-early-muxer]
//   node peer.mjs dial MULTIADDR [--echo-protocol P] [--payload-size N] [--no-early-muxer]
//   node peer.mjs kad --bootstrap MULTIADDR… [--protocol P] [--server] [--provide NAME…]
//                     [--put KEY=HEX…] [--find-providers NAME…] [--get KEY…]
// --identify-push also runs the /ipfs/id/push/1.0.0 service (off by default, as in a bare js node).
// --no-early-muxer sends no stream_muxers list in the noise payload. js still uses the *remote's*
// list if it has one, so this only works against a peer that also sends none.
// kad: a Kademlia DHT node (@libp2p/kad-dht) — see kad() below and README.md for the contract.

// Node 20 lacks Promise.withResolvers, which js-libp2p uses; polyfill before importing it.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify, identifyPush } = await import('@libp2p/identify')
const { ping } = await import('@libp2p/ping')
const { multiaddr } = await import('@multiformats/multiaddr')
const { kadDHT, passthroughMapper } = await import('@libp2p/kad-dht')
const { CID } = await import('multiformats/cid')
const raw = await import('multiformats/codecs/raw')
const { sha256 } = await import('multiformats/hashes/sha2')
const { randomBytes } = await import('node:crypto')

const STEP_TIMEOUT_MS = 10_000
const KAD_PROTOCOL = '/dbloom/kad/1.0.0'
const BOOTSTRAP_TIMEOUT_MS = 10_000 // until the routing table holds its first peer
const BOOTSTRAP_GRACE_MS = 3_000 // then until it holds every bootstrap peer (no error if not)
const FIND_PROVIDERS_MS = 15_000 // collect providers this long at most (no error if cut short)
const KAD_STEP_TIMEOUT_MS = 30_000 // provide / put / get

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const log = (...args) => console.error('[peer.mjs]', ...args)
const errText = (err) => err?.message ?? (err?.type != null ? `${err.type} event` : String(err))
const hex = (buf) => (buf == null ? null : Buffer.from(buf).toString('hex'))

function parseArgs (argv) {
  const opts = {
    mode: argv[0],
    target: null,
    echo: '/dbloom/echo/1.0.0',
    size: 1000,
    push: false,
    // kad mode
    protocol: KAD_PROTOCOL,
    server: false,
    bootstrap: [],
    findProviders: [],
    get: [],
    provide: [],
    put: []
  }
  const value = (i) => {
    if (i >= argv.length) throw new Error(`${argv[i - 1]} needs a value`)
    return argv[i]
  }
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]
    if (a === '--echo-protocol') opts.echo = value(++i)
    else if (a === '--protocol') opts.protocol = value(++i)
    else if (a === '--server') opts.server = true
    else if (a === '--bootstrap') opts.bootstrap.push(value(++i))
    else if (a === '--find-providers') opts.findProviders.push(value(++i))
    else if (a === '--get') opts.get.push(value(++i))
    else if (a === '--provide') opts.provide.push(value(++i))
    else if (a === '--put') opts.put.push(parsePut(value(++i)))
    else if (a === '--payload-size') opts.size = Number.parseInt(argv[++i], 10)
    else if (a === '--identify-push') opts.push = true
    else if (a === '--no-early-muxer') opts.noEarlyMuxer = true
    else if (opts.target == null && !a.startsWith('--')) opts.target = a
    else throw new Error(`unknown argument ${a}`)
  }
  if (!['listen', 'dial', 'kad'].includes(opts.mode)) throw new Error('usage: peer.mjs listen|dial|kad ...')
  if (opts.mode === 'dial' && opts.target == null) throw new Error('dial needs a MULTIADDR')
  if (opts.mode === 'kad' && opts.target != null) throw new Error(`unknown argument ${opts.target}`)
  if (opts.mode === 'kad' && !opts.server && opts.bootstrap.length === 0) {
    throw new Error('kad needs at least one --bootstrap MULTIADDR (or --server)')
  }
  return opts
}

/** "KEY=HEX" → { key, value }; split at the last '=' (hex has none). */
function parsePut (arg) {
  const at = arg.lastIndexOf('=')
  const valueHex = at < 0 ? '' : arg.slice(at + 1)
  if (at <= 0 || !/^([0-9a-fA-F]{2})*$/.test(valueHex)) throw new Error(`--put wants KEY=HEXVALUE, got ${arg}`)
  return { key: arg.slice(0, at), value: Buffer.from(valueHex, 'hex') }
}

function identifyEvent (r) {
  return {
    event: 'identify',
    peer_id: r.peerId.toString(),
    agent: r.agentVersion ?? null,
    protocol_version: r.protocolVersion ?? null,
    protocols: r.protocols,
    listen_addrs: r.listenAddrs.map(String),
    observed_addr: r.observedAddr?.toString() ?? null,
    public_key: hex(r.publicKey),
    signed_peer_record: r.signedPeerRecord != null
  }
}

/** Run fn(signal) under a timeout; the error names the step. */
async function step (name, fn, ms = STEP_TIMEOUT_MS) {
  const signal = AbortSignal.timeout(ms)
  let timer
  const timeout = new Promise((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${name}: timed out after ${ms} ms`)), ms)
  })
  try {
    return await Promise.race([fn(signal), timeout])
  } catch (err) {
    throw new Error(`${name}: ${errText(err)}`)
  } finally {
    clearTimeout(timer)
  }
}

/** Write all of buf to stream respecting backpressure. */
async function sendAll (stream, buf, signal) {
  const CHUNK = 64 * 1024
  for (let off = 0; off < buf.byteLength; off += CHUNK) {
    if (!stream.send(buf.subarray(off, off + CHUNK))) await stream.onDrain({ signal })
  }
}

async function echoHandler (stream) {
  try {
    for await (const chunk of stream) {
      if (!stream.send(chunk)) await stream.onDrain()
    }
    await stream.close()
  } catch (err) {
    log('echo handler error:', errText(err))
    stream.abort(err)
  }
}

async function makeNode (opts, listen) {
  const services = { identify: identify(), ping: ping() }
  if (opts.push) services.identifyPush = identifyPush()
  if (opts.mode === 'kad') {
    services.dht = kadDHT({
      protocol: opts.protocol,
      clientMode: !opts.server,
      peerInfoMapper: passthroughMapper, // keep 127.0.0.1 addresses (the default drops them)
      // records under /dbloom/… : accept anything and take the first; dbloom validates them
      validators: { dbloom: async () => {} },
      selectors: { dbloom: selectHighestSeq }
    })
  }
  return createLibp2p({
    addresses: { listen: listen ? ['/ip4/127.0.0.1/tcp/0'] : [] },
    transports: [tcp()],
    // --no-early-muxer: send no stream_muxers list in the noise handshake payload
    connectionEncrypters: [noise(opts.noEarlyMuxer ? { extensions: { streamMuxers: [] } } : {})],
    streamMuxers: [yamux()],
    services
  })
}

async function listen (opts) {
  const node = await makeNode(opts, true)
  reportConnections(node)
  await node.handle(opts.echo, echoHandler)
  emit({ event: 'listening', peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })
  stayUp(node)
}

/** Keep running until stdin closes or a signal arrives, then stop node and exit 0. */
function stayUp (node) {
  let stopping = false
  const stop = async (why) => {
    if (stopping) return
    stopping = true
    log(`stopping (${why})`)
    await Promise.race([node.stop(), new Promise((resolve) => setTimeout(resolve, 3000))])
    process.exit(0)
  }
  process.stdin.on('end', () => stop('stdin closed'))
  process.stdin.on('error', () => stop('stdin error'))
  process.stdin.resume()
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
}

function reportConnections (node) {
  node.addEventListener('connection:open', (evt) => {
    const c = evt.detail
    emit({ event: 'connection', peer_id: c.remotePeer.toString(), direction: c.direction, remote_addr: c.remoteAddr.toString() })
  })
  node.addEventListener('peer:identify', (evt) => emit(identifyEvent(evt.detail)))
}

async function dial (opts) {
  const node = await makeNode(opts, false)
  try {
    const ma = multiaddr(opts.target)
    const conn = await step('dial', (signal) => node.dial(ma, { signal }))
    for (let i = 0; i < 3; i++) {
      const rtt = await step(`ping ${i + 1}`, (signal) => node.services.ping.ping(ma, { signal }))
      emit({ event: 'ping', rtt_ms: rtt })
    }
    // identify uses its own 5 s read timeout: a remote that never half-closes after its
    // message still "succeeds", but only after 5 s, so report how long it took.
    const started = Date.now()
    const id = await step('identify', () => node.services.identify.identify(conn))
    emit({ ...identifyEvent(id), elapsed_ms: Date.now() - started })

    const payload = randomBytes(opts.size)
    const echoed = await step('echo', async (signal) => {
      const stream = await node.dialProtocol(ma, opts.echo, { signal })
      const chunks = []
      const reading = (async () => { for await (const c of stream) chunks.push(c.subarray()) })()
      await sendAll(stream, payload, signal)
      await stream.close({ signal })
      await reading
      return Buffer.concat(chunks)
    })
    if (!payload.equals(echoed)) {
      throw new Error(`echo: sent ${payload.byteLength} bytes, got ${echoed.byteLength} different bytes back`)
    }
    emit({ event: 'echo', ok: true, bytes: echoed.byteLength })
    emit({ event: 'done', ok: true })
  } finally {
    await Promise.race([node.stop(), new Promise((resolve) => setTimeout(resolve, 3000))])
  }
}

// ---------------------------------------------------------------------------------------------
// kad mode. Prints `listening` (clients listen too), one `routing_table_add` per peer the DHT
// adds, `bootstrapped` once --bootstrap peers are in the routing table, then one event per item:
// provided / put (setup: reaching no peer is fatal), providers / value (results: "nothing
// found" is data, not failure). Then `done` and exit 0, or with --server `ready` and stay up.
// Providers are keyed by CIDv1(raw, sha2-256(utf8 NAME)); records by the UTF-8 bytes of KEY.

const utf8 = (text) => new TextEncoder().encode(text)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Provider key for NAME: CIDv1(raw 0x55, sha2-256(utf8(NAME))); the DHT uses its multihash. */
async function providerCid (name) {
  return CID.createV1(raw.code, await sha256.digest(utf8(name)))
}

/** Record the first few QUERY_ERROR events of a query (why a peer's answer was unusable). */
function errorCollector () {
  const errors = []
  return {
    errors,
    see (event) {
      if (event.name === 'QUERY_ERROR' && errors.length < 10) {
        errors.push({ peer_id: event.from?.toString() ?? null, error: errText(event.error) })
      }
    }
  }
}

/** Dial every bootstrap peer, then wait until the routing table holds them (at least one). */
async function bootstrap (node, addrs) {
  const dht = node.services.dht
  for (const addr of addrs) {
    await step(`dial bootstrap ${addr}`, (signal) => node.dial(multiaddr(addr), { signal }))
  }
  const started = Date.now()
  while (dht.routingTable.size === 0) {
    if (Date.now() - started > BOOTSTRAP_TIMEOUT_MS) {
      throw new Error(`bootstrap: routing table still empty after ${BOOTSTRAP_TIMEOUT_MS} ms ` +
        `(does the peer list ${dht.protocol} in identify and answer /ipfs/ping/1.0.0?)`)
    }
    await sleep(50)
  }
  // peers are added one by one (each after a ping): give the others a moment
  const deadline = Date.now() + BOOTSTRAP_GRACE_MS
  while (dht.routingTable.size < addrs.length && Date.now() < deadline) await sleep(50)
  emit({ event: 'bootstrapped', routing_table_size: dht.routingTable.size })
}

async function kadProvide (dht, name) {
  const cid = await providerCid(name)
  const errs = errorCollector()
  const peers = await step(`provide ${name}`, async (signal) => {
    let sent = 0
    for await (const event of dht.provide(cid, { signal })) {
      errs.see(event)
      if (event.name === 'PEER_RESPONSE' && event.messageName === 'ADD_PROVIDER') sent++
    }
    return sent
  }, KAD_STEP_TIMEOUT_MS)
  if (peers === 0) throw new Error(`provide ${name}: no peer took the provider record ${JSON.stringify(errs.errors)}`)
  emit({ event: 'provided', name, cid: cid.toString(), peers, query_errors: errs.errors })
}

async function kadPut (dht, { key, value }) {
  const errs = errorCollector()
  const peers = await step(`put ${key}`, async (signal) => {
    let stored = 0
    for await (const event of dht.put(utf8(key), value, { signal })) {
      errs.see(event)
      // count replies that echo the record back (kad-dht reports other replies as QUERY_ERROR)
      if (event.name === 'PEER_RESPONSE' && event.messageName === 'PUT_VALUE' &&
          event.record != null && Buffer.from(event.record.value).equals(value)) stored++
    }
    return stored
  }, KAD_STEP_TIMEOUT_MS)
  if (peers === 0) throw new Error(`put ${key}: no peer stored the record ${JSON.stringify(errs.errors)}`)
  emit({ event: 'put', key, peers, query_errors: errs.errors })
}

/** Collect providers until the query ends or FIND_PROVIDERS_MS passes (then timed_out: true). */
async function kadFindProviders (dht, name) {
  const cid = await providerCid(name)
  const errs = errorCollector()
  const found = new Map() // peer id → Set of addrs
  let timedOut = false
  const signal = AbortSignal.timeout(FIND_PROVIDERS_MS)
  try {
    for await (const event of dht.findProviders(cid, { signal })) {
      errs.see(event)
      if (event.name !== 'PROVIDER') continue
      for (const peer of event.providers) {
        const id = peer.id.toString()
        if (!found.has(id)) found.set(id, new Set())
        for (const ma of peer.multiaddrs) found.get(id).add(ma.toString())
      }
    }
  } catch (err) {
    if (!signal.aborted) throw new Error(`find-providers ${name}: ${errText(err)}`)
    timedOut = true
  }
  const peers = [...found].map(([id, addrs]) => ({ peer_id: id, addrs: [...addrs] }))
  emit({ event: 'providers', name, cid: cid.toString(), peers, timed_out: timedOut, query_errors: errs.errors })
}

// dbloom node records are signed envelopes (protobuf field 3 = payload) whose
// payload's field 1 is a sequence number; the highest wins, as on the Python side,
// so js never "corrects" a peer with an older record it would refuse.
function readVarint (buf, pos) {
  let value = 0n
  let shift = 0n
  while (pos < buf.length) {
    const byte = buf[pos++]
    value |= BigInt(byte & 0x7f) << shift
    if ((byte & 0x80) === 0) return [value, pos]
    shift += 7n
  }
  throw new Error('truncated varint')
}

function field (buf, wanted) {
  let pos = 0
  while (pos < buf.length) {
    const [key, next] = readVarint(buf, pos)
    pos = next
    const number = Number(key >> 3n)
    const type = Number(key & 7n)
    if (type === 0) {
      const [value, after] = readVarint(buf, pos)
      if (number === wanted) return value
      pos = after
    } else if (type === 2) {
      const [length, after] = readVarint(buf, pos)
      const end = after + Number(length)
      if (number === wanted) return buf.subarray(after, end)
      pos = end
    } else {
      throw new Error('unexpected wire type')
    }
  }
  return undefined
}

function envelopeSeq (value) {
  try {
    const payload = field(value, 3)
    const seq = payload === undefined ? undefined : field(payload, 1)
    return typeof seq === 'bigint' ? seq : -1n
  } catch {
    return -1n
  }
}

function selectHighestSeq (key, values) {
  let best = 0
  for (let i = 1; i < values.length; i++) {
    if (envelopeSeq(values[i]) > envelopeSeq(values[best])) best = i
  }
  return best
}

/** The best value for KEY (the selector picks), or an error if none was found. */
async function kadGet (dht, key) {
  const errs = errorCollector()
  try {
    const value = await step(`get ${key}`, async (signal) => {
      let best = null
      for await (const event of dht.get(utf8(key), { signal })) {
        errs.see(event)
        if (event.name === 'VALUE') best = event // the last VALUE event is the selected record
      }
      if (best == null) throw new Error('not found')
      return best.value
    }, KAD_STEP_TIMEOUT_MS)
    emit({ event: 'value', key, value_hex: hex(value), query_errors: errs.errors })
  } catch (err) {
    emit({ event: 'value', key, error: errText(err), query_errors: errs.errors })
  }
}

async function kad (opts) {
  const node = await makeNode(opts, true) // clients listen too: a provider record needs addresses
  const dht = node.services.dht
  dht.routingTable.addEventListener('peer:add', (evt) => {
    emit({ event: 'routing_table_add', peer_id: evt.detail.toString(), size: dht.routingTable.size })
  })
  if (opts.server) reportConnections(node)
  emit({ event: 'listening', peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })
  if (opts.server) stayUp(node)
  try {
    if (opts.bootstrap.length > 0) await bootstrap(node, opts.bootstrap)
    for (const name of opts.provide) await kadProvide(dht, name)
    for (const put of opts.put) await kadPut(dht, put)
    for (const name of opts.findProviders) await kadFindProviders(dht, name)
    for (const key of opts.get) await kadGet(dht, key)
    emit({ event: opts.server ? 'ready' : 'done', ok: true })
  } finally {
    if (!opts.server) await Promise.race([node.stop(), sleep(3000)])
  }
}

try {
  const opts = parseArgs(process.argv.slice(2))
  if (opts.mode === 'listen') await listen(opts)
  else if (opts.mode === 'kad') {
    await kad(opts)
    if (!opts.server) process.exit(0)
  } else {
    await dial(opts)
    process.exit(0)
  }
} catch (err) {
  log(err.stack ?? err)
  emit({ event: 'error', message: errText(err) })
  process.exit(1)
}
