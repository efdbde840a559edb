// node's cluster-hub (npm cluster-hub@0.1.2), the original clusterhub ports:
// a master answering "echo" and one worker making requestMaster round trips,
// driven by the benchmark (benchmarks/_node.py) over the master's stdin and
// stdout, one JSON object per line.
//
// master -> stdout, once the worker's hub is listening:
//     {"master": <pid>, "worker": <pid>}
// stdin "N" -> the worker makes N round trips, one after the other, timed
// around the loop with process.hrtime -> stdout {"t": <seconds per round trip>}
// stdin closed -> the master kills the worker and exits.
'use strict';

const cluster = require('cluster');
const readline = require('readline');
const Hub = require('cluster-hub');

const hub = new Hub();

function out(obj) {
    process.stdout.write(JSON.stringify(obj) + '\n');  // (synchronous for pipes on Linux)
}

if (cluster.isMaster) {
    hub.on('echo', function (data, sender, callback) {
        callback(null, data);
    });
    const worker = cluster.fork();
    hub.on('ready', function () {
        out({master: process.pid, worker: worker.process.pid});
        const lines = readline.createInterface({input: process.stdin});
        lines.on('line', function (line) {
            hub.requestWorker(worker, 'run', parseInt(line, 10), function (err, seconds) {
                out(err ? {error: String(err)} : {t: seconds});
            });
        });
        lines.on('close', function () {
            worker.kill();
            process.exit(0);
        });
    });
} else {
    hub.on('run', function (n, sender, callback) {
        let i = 0;
        const t0 = process.hrtime.bigint();
        const next = function () {
            if (i === n) {
                callback(null, Number(process.hrtime.bigint() - t0) / 1e9 / n);
                return;
            }
            hub.requestMaster('echo', i++, next);
        };
        next();
    });
    hub.sendToMaster('ready');
}
