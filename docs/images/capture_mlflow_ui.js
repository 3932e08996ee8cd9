// Screenshots of the MLflow UI for docs/mlflow.md, taken with headless Chromium over the
// DevTools protocol (the UI is a JavaScript app that needs clicks: unfold runs, close panels).
//
//   node --experimental-websocket docs/images/capture_mlflow_ui.js URL OUT.png [STEPS] [WAIT_MS]
//
// STEPS: JavaScript snippets separated by a line holding only ";;", run in the page in turn;
// a step "WAIT <ms>" pauses, a step "SHOT <path>" takes an extra screenshot. The page is
// 1600x1000; OUT.png is taken after the last step. Needs Node 20+ and `chromium` on PATH.
const { spawn } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const [url, out, script = '', waitMs = '15000'] = process.argv.slice(2);
const port = 9333;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chr-'));
const chrome = spawn('chromium', ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
  '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync',
  `--user-data-dir=${dir}`, '--window-size=1600,1000', `--remote-debugging-port=${port}`, 'about:blank'],
  { stdio: 'ignore' });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  let target;
  for (let i = 0; i < 100 && !target; i++) {
    await sleep(200);
    try {
      const list = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
      target = list.find((t) => t.type === 'page');
    } catch (e) {}
  }
  const ws = new WebSocket(target.webSocketDebuggerUrl);
  await new Promise((r) => ws.addEventListener('open', r));
  let id = 0; const pending = new Map();
  ws.addEventListener('message', (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.id && pending.has(msg.id)) { pending.get(msg.id)(msg); pending.delete(msg.id); }
  });
  const send = (method, params = {}) => new Promise((r) => { const i = ++id; pending.set(i, r); ws.send(JSON.stringify({ id: i, method, params })); });
  await send('Emulation.setDeviceMetricsOverride', { width: 1600, height: 1000, deviceScaleFactor: 1, mobile: false });
  await send('Page.enable');
  await send('Page.navigate', { url });
  await sleep(Number(waitMs));
  if (script) {
    for (const step of script.split('\n;;\n')) {
      if (step.startsWith('SHOT ')) {
        const snap = await send('Page.captureScreenshot', { format: 'png' });
        fs.writeFileSync(step.slice(5).trim(), Buffer.from(snap.result.data, 'base64'));
        console.log('wrote', step.slice(5).trim());
        continue;
      }
      if (step.startsWith('WAIT ')) { await sleep(Number(step.slice(5))); continue; }
      const res = await send('Runtime.evaluate', { expression: step, awaitPromise: true, returnByValue: true });
      console.log('eval:', JSON.stringify(res.result && res.result.result && res.result.result.value).slice(0, 3000));
      await sleep(2500);
    }
  }
  const shot = await send('Page.captureScreenshot', { format: 'png' });
  fs.writeFileSync(out, Buffer.from(shot.result.data, 'base64'));
  console.log('wrote', out);
  ws.close(); chrome.kill('SIGKILL');
  process.exit(0);
})().catch((e) => { console.error(e); chrome.kill('SIGKILL'); process.exit(1); });
