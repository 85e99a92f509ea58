// Interop peer: drives @elastic/opamp-client-node 0.5.0 against a Flotilla server and prints one JSON event per line.
//
// Usage: node peer.js --endpoint URL [--heartbeat SECONDS] [--name NAME] [--run-seconds N]
// stdout, one JSON object per line:
//   {"event":"started","instance_uid":"<32 hex>","uuid":"<canonical>","capabilities":N}
//   {"event":"connected"}                               first successful exchange
//   {"event":"remote_config","hash":"<hex>","files":{name: body}}  then APPLIED is reported
//   {"event":"remote_config_applied","hash":"<hex>"}
//   {"event":"full_state_requested"}                    server set ServerToAgentFlags.ReportFullState
//   {"event":"instance_uid_changed","instance_uid":"<32 hex>","uuid":"..."}  adopted new_instance_uid
//   {"event":"send_failed","error":"...","retry_after_ms":N|null}
//   {"event":"stopped"}
// Library logs (warn and above; all with PEER_LOG=trace) go to stderr.
// Modules come from the installed tree: run with NODE_PATH=<.peers>/node/node_modules.
// The library cannot report health: any capability beyond 0x3003 makes createOpAMPClient throw.
'use strict';

const {channel} = require('diagnostics_channel');
const {parseArgs} = require('util');
const {
    createOpAMPClient,
    AgentCapabilities,
    RemoteConfigStatuses,
    DIAG_CH_SEND_SUCCESS,
    DIAG_CH_SEND_FAIL,
} = require('@elastic/opamp-client-node');

function emit(event, fields = {}) {
    process.stdout.write(JSON.stringify({event, ...fields}) + '\n');
}

const hex = (bytes) => Buffer.from(bytes).toString('hex');
const uuidOf = (h) =>
    `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;

const {values: args} = parseArgs({
    options: {
        endpoint: {type: 'string'},
        heartbeat: {type: 'string', default: '1'},
        name: {type: 'string', default: 'node-peer'},
        'run-seconds': {type: 'string', default: '3600'},
    },
});
if (!args.endpoint) {
    process.stderr.write('peer.js: --endpoint URL is required\n');
    process.exit(2);
}

const LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'];
const minLevel = Math.max(0, LEVELS.indexOf((process.env.PEER_LOG || 'warn').toLowerCase()));
const log = {};
LEVELS.forEach((lvl, i) => {
    log[lvl] = (...a) => {
        if (i >= minLevel) {
            const parts = a.map((x) => (typeof x === 'string' ? x : safeJson(x)));
            process.stderr.write(`[opamp ${lvl}] ${parts.join(' ')}\n`);
        }
    };
});
function safeJson(x) {
    try {
        return JSON.stringify(x, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));
    } catch {
        return String(x);
    }
}

const capabilities =
    BigInt(AgentCapabilities.AgentCapabilities_AcceptsRemoteConfig) |
    BigInt(AgentCapabilities.AgentCapabilities_ReportsRemoteConfig);

const client = createOpAMPClient({
    log,
    endpoint: args.endpoint,
    capabilities,
    heartbeatIntervalSeconds: Number(args.heartbeat),
    diagEnabled: true,
    onMessage: ({remoteConfig}) => {
        if (!remoteConfig) return;
        const files = {};
        const configMap = remoteConfig.config?.configMap ?? {};
        for (const [name, file] of Object.entries(configMap)) {
            files[name] = Buffer.from(file.body).toString('utf8');
        }
        const hash = hex(remoteConfig.configHash);
        emit('remote_config', {hash, files});
        client.setRemoteConfigStatus({
            status: RemoteConfigStatuses.RemoteConfigStatuses_APPLIED,
            lastRemoteConfigHash: remoteConfig.configHash,
        });
        emit('remote_config_applied', {hash});
    },
});
client.setAgentDescription({
    identifyingAttributes: {'service.name': args.name},
    nonIdentifyingAttributes: {'host.name': args.name},
});

let uid = hex(client.getInstanceUid());
let connected = false;
// Diagnostics channels are the library's only view of raw ServerToAgent messages (flags).
channel(DIAG_CH_SEND_SUCCESS).subscribe(({s2a}) => {
    if (!connected) {
        connected = true;
        emit('connected');
    }
    if (s2a && s2a.flags & 1n) emit('full_state_requested');
    const now = hex(client.getInstanceUid());
    if (now !== uid) {
        uid = now;
        emit('instance_uid_changed', {instance_uid: uid, uuid: uuidOf(uid)});
    }
});
channel(DIAG_CH_SEND_FAIL).subscribe(({err, retryAfterMs}) => {
    emit('send_failed', {error: String(err && err.message ? err.message : err), retry_after_ms: retryAfterMs ?? null});
});

// The library always adds ReportsStatus | ReportsHeartbeat (0x3003 in total here).
const sentCaps =
    capabilities |
    BigInt(AgentCapabilities.AgentCapabilities_ReportsStatus) |
    BigInt(AgentCapabilities.AgentCapabilities_ReportsHeartbeat);
emit('started', {instance_uid: uid, uuid: uuidOf(uid), capabilities: Number(sentCaps)});
client.start();

let stopping = false;
async function stop() {
    if (stopping) return;
    stopping = true;
    clearTimeout(timer);
    try {
        await client.shutdown(); // 0.5.0 sends no agent_disconnect
    } catch (err) {
        process.stderr.write(`shutdown error: ${err}\n`);
    }
    emit('stopped');
    process.exit(0);
}
// A ref'd timer keeps the process alive (the library's send timers are unref'd).
const timer = setTimeout(stop, Number(args['run-seconds']) * 1000);
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
