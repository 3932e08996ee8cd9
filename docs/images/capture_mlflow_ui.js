// Screenshots of the MLflow UI for docs/mlflow.md, taken with headless Chromium over the
// DevTools protocol (the UI is a JavaScript app that needs clicks: unfold runs, close panels).
//
//   node --experimental-websocket docs/images/capture_mlflow_ui.js URL OUT.png [STEPS] [WAIT_MS]
//
// STEPS: JavaScript snippets separated by a line holding only ";;", run in the page in turn
// (each one's value, or its exception, is printed); a step "WAIT <ms>" pauses, a step
// "SHOT <path>" takes an extra screenshot, a step "DRAG x1 y1 x2 y2" drags the mouse (CSS
// pixels; e.g. a column header's right edge, to widen the column). The page is 1600x1000;
// OUT.png is taken after the last step. Needs Node 20+ and `chromium` on PATH. Every run
// starts Chromium with a fresh profile, so the page opens as it would for a new user.
//
// How the screenshots in docs/mlflow.md were taken (MLflow 3.17.2; the selectors may change):
// - open the page with `?workflowType=machine_learning` after the route (the Model training
//   view; a fresh profile otherwise opens in GenAI), then close the assistant panel:
//     document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]')?.click()
// - React/Radix menus, tabs and dropdowns open on pointer events, not on el.click(); define
//     window.press = (el) => { const o = { bubbles: true, cancelable: true, button: 0 };
//       for (const t of ['pointerdown', 'mousedown', 'pointerup', 'mouseup'])
//         el.dispatchEvent(new (t.startsWith('pointer') ? PointerEvent : MouseEvent)(t, o));
//       el.click(); }
//   and a setter for React inputs: Object.getOwnPropertyDescriptor(HTMLInputElement.prototype,
//   'value').set.call(input, text), then input.dispatchEvent(new Event('input', {bubbles: true}))
// - unfold the study run: document.querySelector('button[data-component-id*="runnamecellrenderer"]').click()
// - columns: click the "Columns" button, type each name into input[placeholder="Search columns"],
//   click the .du-bois-light-tree-checkbox of the .du-bois-light-tree-treenode whose text matches
// - widen a column: DRAG from its header's right edge (.ag-header-cell[col-id=...] rect)
// - sort: press the "Sort:" button, type into input[placeholder="Search"], press the item,
//   press "Sort:" again and button[aria-label="Sort ascending"]
// - chart view: the <label> whose input has value "CHART"; type into
//   input[placeholder="Search metric charts"]; eye toggles are the labels reading "Hide run" /
//   "Unhide run" in each .ag-row; DRAG the bar between run list and charts, or a chart's
//   bottom-right corner (the div with cursor se-resize), to resize
// - artifacts: press button[role=tab] "Artifacts", then press the file name in the tree
// The screenshots were then cropped to what they show (PIL: Image.open(p).crop(...).save(p)).
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
      if (step.startsWith('DRAG ')) {  // DRAG x1 y1 x2 y2: a real mouse drag (e.g. to widen a column)
        const [x1, y1, x2, y2] = step.slice(5).trim().split(/\s+/).map(Number);
        const mouse = (type, x, y, buttons) => send('Input.dispatchMouseEvent', { type, x, y, button: 'left', buttons, clickCount: 1 });
        await mouse('mouseMoved', x1, y1, 0); await mouse('mousePressed', x1, y1, 1);
        for (let i = 1; i <= 10; i++) await mouse('mouseMoved', x1 + (x2 - x1) * i / 10, y1 + (y2 - y1) * i / 10, 1);
        await mouse('mouseReleased', x2, y2, 0);
        await mouse('mouseMoved', 1, 500, 0);  // off the header, or its tooltip shows in the screenshot
        await sleep(1000);
        continue;
      }
      const res = await send('Runtime.evaluate', { expression: step, awaitPromise: true, returnByValue: true });
      const r = res.result || {};
      if (r.exceptionDetails) console.log('eval error:', (r.exceptionDetails.exception && r.exceptionDetails.exception.description) || r.exceptionDetails.text);
      else console.log('eval:', String(JSON.stringify(r.result && r.result.value)).slice(0, 3000));
      await sleep(2500);
    }
  }
  const shot = await send('Page.captureScreenshot', { format: 'png' });
  fs.writeFileSync(out, Buffer.from(shot.result.data, 'base64'));
  console.log('wrote', out);
  ws.close(); chrome.kill('SIGKILL');
  await sleep(500); fs.rmSync(dir, { recursive: true, force: true });
  process.exit(0);
})().catch((e) => { console.error(e); chrome.kill('SIGKILL'); process.exit(1); });
