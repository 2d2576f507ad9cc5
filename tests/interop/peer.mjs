// js-libp2p peer for dbloom interop tests. One JSON object per line on stdout; logs on stderr.
//   node peer.mjs listen [--echo-protocol P] [--identify-push] [--no-early-muxer]
//   node peer.mjs dial MULTIADDR [--echo-protocol P] [--payload-size N] [--no-early-muxer]
// --identify-push also runs the /ipfs/id/push/1.0.0 service (off by default, as in a bare js node).
// --no-early-muxer sends no stream_muxers list in the noise payload. js still uses the *remote's*
// list if it has one, so this only works against a peer that also sends none.

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
const { randomBytes } = await import('node:crypto')

const STEP_TIMEOUT_MS = 10_000

const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const log = (...args) => console.error('[peer.mjs]', ...args)
const errText = (err) => err?.message ?? (err?.type != null ? `${err.type} event` : String(err))
const hex = (buf) => (buf == null ? null : Buffer.from(buf).toString('hex'))

function parseArgs (argv) {
  const opts = { mode: argv[0], target: null, echo: '/dbloom/echo/1.0.0', size: 1000, push: false }
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]
    if (a === '--echo-protocol') opts.echo = argv[++i]
    else if (a === '--payload-size') opts.size = Number.parseInt(argv[++i], 10)
    else if (a === '--identify-push') opts.push = true
    else if (a === '--no-early-muxer') opts.noEarlyMuxer = true
    else if (opts.target == null && !a.startsWith('--')) opts.target = a
    else throw new Error(`unknown argument ${a}`)
  }
  if (!['listen', 'dial'].includes(opts.mode)) throw new Error('usage: peer.mjs listen|dial ...')
  if (opts.mode === 'dial' && opts.target == null) throw new Error('dial needs a MULTIADDR')
  return opts
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
async function step (name, fn) {
  const signal = AbortSignal.timeout(STEP_TIMEOUT_MS)
  let timer
  const timeout = new Promise((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${name}: timed out after ${STEP_TIMEOUT_MS} ms`)), STEP_TIMEOUT_MS)
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
  node.addEventListener('connection:open', (evt) => {
    const c = evt.detail
    emit({ event: 'connection', peer_id: c.remotePeer.toString(), direction: c.direction, remote_addr: c.remoteAddr.toString() })
  })
  node.addEventListener('peer:identify', (evt) => emit(identifyEvent(evt.detail)))
  await node.handle(opts.echo, echoHandler)
  emit({ event: 'listening', peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })

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

try {
  const opts = parseArgs(process.argv.slice(2))
  if (opts.mode === 'listen') await listen(opts)
  else {
    await dial(opts)
    process.exit(0)
  }
} catch (err) {
  log(err.stack ?? err)
  emit({ event: 'error', message: errText(err) })
  process.exit(1)
}
