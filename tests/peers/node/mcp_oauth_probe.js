// Connects to an MCP endpoint with the official TypeScript SDK (@modelcontextprotocol/sdk), set up
// as the MCP Inspector sets up its HTTP connections, and reports how the connection ends.
//
// Usage: node mcp_oauth_probe.js --url URL --token TOKEN [--oauth]
//   --oauth   give the transport an OAuth client provider, as the Inspector does: on a 401 the
//             SDK then runs OAuth discovery and registration before giving up.
// stdout, one JSON object:
//   {"connected": true, "tools": N}                  the token was accepted
//   {"connected": false, "error": "...", "error_name": "...",
//    "oauth_events": ["saveClientInformation", "redirectToAuthorization", ...],
//    "requests": [{"method": "GET", "path": "/.well-known/...", "status": 404}, ...]}
// Modules come from the installed tree: run with NODE_PATH=<.peers>/node/node_modules.
'use strict';

const {parseArgs} = require('util');
const {Client} = require('@modelcontextprotocol/sdk/client/index.js');
const {StreamableHTTPClientTransport} = require('@modelcontextprotocol/sdk/client/streamableHttp.js');

async function main() {
    const {values} = parseArgs({
        options: {
            url: {type: 'string'},
            token: {type: 'string'},
            oauth: {type: 'boolean', default: false},
        },
    });
    const requests = [];
    const recordingFetch = async (input, init) => {
        const resp = await fetch(input, init);
        const url = new URL(typeof input === 'string' || input instanceof URL ? input : input.url);
        requests.push({method: (init && init.method) || 'GET', path: url.pathname, status: resp.status});
        return resp;
    };
    // What the Inspector's provider does, recorded instead of opening a browser.
    const oauthEvents = [];
    const callback = 'http://127.0.0.1:6274/oauth/callback';
    const provider = {
        get redirectUrl() { return callback; },
        get clientMetadata() {
            return {client_name: 'flotilla-probe', redirect_uris: [callback],
                    grant_types: ['authorization_code'], response_types: ['code']};
        },
        clientInformation() { return undefined; },
        saveClientInformation() { oauthEvents.push('saveClientInformation'); },
        tokens() { return undefined; },
        saveTokens() { oauthEvents.push('saveTokens'); },
        redirectToAuthorization(url) { oauthEvents.push(`redirectToAuthorization ${url}`); },
        saveCodeVerifier() { oauthEvents.push('saveCodeVerifier'); },
        codeVerifier() { return 'unused'; },
    };
    const transport = new StreamableHTTPClientTransport(new URL(values.url), {
        requestInit: {headers: {Authorization: `Bearer ${values.token}`}},
        fetch: recordingFetch,
        ...(values.oauth ? {authProvider: provider} : {}),
    });
    const client = new Client({name: 'flotilla-probe', version: '0.0.0'});
    try {
        await client.connect(transport);
        const tools = await client.listTools();
        await transport.terminateSession();
        await client.close();
        process.stdout.write(JSON.stringify({connected: true, tools: tools.tools.length}) + '\n');
    } catch (e) {
        process.stdout.write(JSON.stringify({
            connected: false, error: String(e && e.message), error_name: e && e.constructor && e.constructor.name,
            oauth_events: oauthEvents, requests,
        }) + '\n');
    }
}

main().catch((e) => {
    process.stderr.write(`probe failed: ${e && e.stack}\n`);
    process.exit(1);
});
