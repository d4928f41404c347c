// The Orchestrator dashboard: the tenant's runs and a run's page, live from WatchExecutions
// and WatchExecution over Connect (binary), with the control calls. Built by `make web`.
import { render } from "preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import type { JsonValue } from "@bufbuild/protobuf";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import {
  ClarificationCategory,
  type Clarification,
  EventType,
  type Execution,
  type ExecutionEvent,
  ExecutionStatus,
  OrchestratorService,
  StepStatus,
} from "./gen/orchestrator/v1/orchestrator_pb";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb";

// ---------------------------------------------------------------- session

const TENANT = "orchestrator.tenant";
const API_KEY = "orchestrator.apiKey";

function initialTenant(): string {
  // `/?tenant=<uuid>` preselects the tenant; it is kept, then dropped from the address bar.
  const url = new URL(location.href);
  const given = url.searchParams.get("tenant");
  if (given) {
    localStorage.setItem(TENANT, given);
    url.searchParams.delete("tenant");
    history.replaceState(null, "", url.toString());
  }
  return localStorage.getItem(TENANT) ?? "";
}

const session = { tenant: initialTenant(), apiKey: localStorage.getItem(API_KEY) ?? "" };

const credentials: Interceptor = (next) => async (req) => {
  req.header.set("x-tenant-id", session.tenant);
  if (session.apiKey) req.header.set("authorization", `Bearer ${session.apiKey}`);
  return next(req);
};

const client = createClient(
  OrchestratorService,
  createConnectTransport({
    baseUrl: location.origin,
    useBinaryFormat: true,
    interceptors: [credentials],
  }),
);

// ---------------------------------------------------------------- helpers

type Problem = { code: string; message: string; reason: string; violations: [string, string][] };

function problemOf(err: unknown): Problem {
  const e = ConnectError.from(err);
  const info = e.findDetails(ErrorInfoSchema)[0];
  const bad = e.findDetails(BadRequestSchema)[0];
  return {
    code: Code[e.code],
    message: e.rawMessage,
    reason: info?.reason ?? "",
    violations: (bad?.fieldViolations ?? []).map((v) => [v.field, v.description]),
  };
}

const statusName = (s: ExecutionStatus) => ExecutionStatus[s].replace("EXECUTION_STATUS_", "");
const stepName = (s: StepStatus) => StepStatus[s].replace("STEP_STATUS_", "");
const when = (t?: Timestamp) => (t ? timestampDate(t) : undefined);

function age(t?: Timestamp): string {
  const d = when(t);
  if (!d) return "";
  const s = Math.max(0, Math.round((Date.now() - d.getTime()) / 1000));
  return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m` : `${Math.floor(s / 3600)}h`;
}

function duration(start?: Timestamp, end?: Timestamp): string {
  const a = when(start);
  if (!a) return "";
  const ms = (when(end) ?? new Date()).getTime() - a.getTime();
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

const show = (v: unknown) => (v === undefined ? "" : JSON.stringify(v));
const TERMINAL = new Set([
  ExecutionStatus.COMPLETED,
  ExecutionStatus.FAILED,
  ExecutionStatus.CANCELLED,
]);

function useHash(): string {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const on = () => setHash(location.hash);
    addEventListener("hashchange", on);
    return () => removeEventListener("hashchange", on);
  }, []);
  return hash;
}

function ProblemView({ problem }: { problem: Problem | null }) {
  if (!problem) return null;
  return (
    <div class="problem" role="alert">
      <strong data-reason={problem.reason}>{problem.reason || problem.code}</strong>{" "}
      <span>{problem.message}</span>
      {problem.violations.length > 0 && (
        <ul>
          {problem.violations.map(([field, description]) => (
            <li>
              <code>{field}</code>: {description}
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}

// ---------------------------------------------------------------- the tenant form

function SessionForm({ onChange }: { onChange: () => void }) {
  const [tenant, setTenant] = useState(session.tenant);
  const [apiKey, setApiKey] = useState(session.apiKey);
  return (
    <form
      class="session"
      onSubmit={(e) => {
        e.preventDefault();
        session.tenant = tenant.trim();
        session.apiKey = apiKey.trim();
        localStorage.setItem(TENANT, session.tenant);
        localStorage.setItem(API_KEY, session.apiKey);
        onChange();
      }}
    >
      <label>
        Tenant <input name="tenant" value={tenant} size={38} onInput={(e) => setTenant(e.currentTarget.value)} />
      </label>{" "}
      <label>
        API key{" "}
        <input name="apiKey" type="password" value={apiKey} onInput={(e) => setApiKey(e.currentTarget.value)} />
      </label>{" "}
      <button type="submit">Use</button>
    </form>
  );
}

// ---------------------------------------------------------------- the list

function RunList({ epoch }: { epoch: number }) {
  const [runs, setRuns] = useState(new Map<string, Execution>());
  const [problem, setProblem] = useState<Problem | null>(null);
  const [status, setStatus] = useState("");
  const [label, setLabel] = useState("");
  const [, tick] = useState(0);

  useEffect(() => {
    const timer = setInterval(() => tick((n) => n + 1), 1000);
    return () => clearInterval(timer);
  }, []);

  useEffect(() => {
    if (!session.tenant) return;
    const abort = new AbortController();
    const merge = (e: Execution) =>
      setRuns((old) => {
        const known = old.get(e.runId);
        if (known && known.lastSequence > e.lastSequence) return old;
        // Status events carry the run-level fields; keep what a snapshot said of the rest.
        return new Map(old).set(e.runId, { ...(known ?? {}), ...e, steps: known?.steps ?? e.steps });
      });
    (async () => {
      for (;;) {
        try {
          // List, then watch from the list's cursor: a run that starts or ends in between is
          // in the watch (Kubernetes' list-then-watch); a reconnect lists again.
          const page = await client.listExecutions({ pageSize: 200 }, { signal: abort.signal });
          setRuns(new Map(page.executions.map((e) => [e.runId, e])));
          setProblem(null);
          const changes = client.watchExecutions({ afterCursor: page.watchCursor }, { signal: abort.signal });
          for await (const res of changes) {
            const e = res.event?.execution;
            if (e && e.runId) merge(e);
          }
        } catch (err) {
          if (abort.signal.aborted) return;
          setProblem(problemOf(err));
        }
        await new Promise((r) => setTimeout(r, 1000));
      }
    })();
    return () => abort.abort();
  }, [epoch]);

  const shown = useMemo(() => {
    const [key, value] = label.split("=", 2).map((s) => s.trim());
    return [...runs.values()]
      .filter((r) => !status || statusName(r.status) === status)
      .filter((r) => !key || (value === undefined ? key in r.labels : r.labels[key] === value))
      .sort((a, b) => (when(b.createdAt)?.getTime() ?? 0) - (when(a.createdAt)?.getTime() ?? 0));
  }, [runs, status, label]);

  return (
    <section>
      <h2>Runs</h2>
      <ProblemView problem={problem} />
      <div class="filters">
        <label>
          Status{" "}
          <select name="status" value={status} onChange={(e) => setStatus(e.currentTarget.value)}>
            <option value="">any</option>
            {["PENDING", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "CANCELLED"].map((s) => (
              <option value={s}>{s}</option>
            ))}
          </select>
        </label>{" "}
        <label>
          Label <input name="label" placeholder="key=value" value={label} onInput={(e) => setLabel(e.currentTarget.value)} />
        </label>
      </div>
      <table class="runs">
        <thead>
          <tr>
            <th>Run</th><th>Plan</th><th>Status</th><th>Progress</th><th>Labels</th><th>Age</th>
          </tr>
        </thead>
        <tbody>
          {shown.map((r) => (
            <tr data-run={r.runId}>
              <td><a href={`#/runs/${r.runId}`}>{r.runId.slice(0, 8)}</a></td>
              <td>{r.planName || r.planId}</td>
              <td class={`status ${statusName(r.status)}`}>{statusName(r.status)}</td>
              <td><progress max={1} value={r.progress} /> {Math.round(r.progress * 100)}%</td>
              <td>{Object.entries(r.labels).map(([k, v]) => <span class="label">{k}={v}</span>)}</td>
              <td>{age(r.createdAt)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

// ---------------------------------------------------------------- a run

function applyEvent(run: Execution | null, ev: ExecutionEvent): Execution | null {
  const e = ev.execution;
  if (!e) return run;
  if (ev.type === EventType.SNAPSHOT || !run) return e;
  const steps = [...run.steps];
  for (const step of e.steps) {
    const at = steps.findIndex((s) => s.stepId === step.stepId);
    if (at >= 0) steps[at] = step;
    else steps.push(step);
  }
  return { ...run, ...e, steps };
}

function ClarificationForm({ runId, c, onProblem }: { runId: string; c: Clarification; onProblem: (p: Problem | null) => void }) {
  const [value, setValue] = useState("");
  const send = async (response: JsonValue) => {
    try {
      await client.respondToClarification({ runId, clarificationId: c.clarificationId, response: toValue(response) });
      onProblem(null);
    } catch (err) {
      onProblem(problemOf(err));
    }
  };
  let body;
  if (c.category === ClarificationCategory.MULTIPLE_CHOICE) {
    body = c.options.map((o) => <button type="button" onClick={() => send(o)}>{o}</button>);
  } else if (
    c.category === ClarificationCategory.VALUE_CONFIRMATION ||
    c.category === ClarificationCategory.USER_VERIFICATION
  ) {
    body = [
      <button type="button" onClick={() => send(true)}>Confirm</button>,
      <button type="button" onClick={() => send(false)}>Reject</button>,
    ];
  } else {
    body = [
      <input name="answer" value={value} onInput={(e) => setValue(e.currentTarget.value)} />,
      <button type="submit">Answer</button>,
    ];
  }
  return (
    <form class="clarification" data-step={c.stepId} onSubmit={(e) => { e.preventDefault(); send(value); }}>
      <p>{c.prompt}</p>
      {body}
    </form>
  );
}

function toValue(v: JsonValue): { kind: { case: "stringValue"; value: string } | { case: "boolValue"; value: boolean } } {
  return typeof v === "boolean"
    ? { kind: { case: "boolValue", value: v } }
    : { kind: { case: "stringValue", value: String(v) } };
}

function RunPage({ runId, epoch }: { runId: string; epoch: number }) {
  const [run, setRun] = useState<Execution | null>(null);
  const [events, setEvents] = useState<ExecutionEvent[]>([]);
  const [problem, setProblem] = useState<Problem | null>(null);
  const [notice, setNotice] = useState("");

  useEffect(() => {
    const abort = new AbortController();
    (async () => {
      let after = 0n;
      for (;;) {
        try {
          for await (const res of client.watchExecution({ runId, afterSequence: after }, { signal: abort.signal })) {
            const ev = res.event;
            if (!ev || ev.type === EventType.HEARTBEAT) continue;
            after = ev.sequence > after ? ev.sequence : after;
            setRun((old) => applyEvent(old, ev));
            if (ev.type !== EventType.SNAPSHOT) setEvents((old) => [...old, ev]);
          }
          return; // the run is terminal: its stream ended
        } catch (err) {
          if (abort.signal.aborted) return;
          setProblem(problemOf(err));
        }
        await new Promise((r) => setTimeout(r, 1000));
      }
    })();
    return () => abort.abort();
  }, [runId, epoch]);

  const act = (name: string, call: () => Promise<{ message?: string }>) => async () => {
    try {
      const res = await call();
      setProblem(null);
      setNotice(res.message || `${name} done`);
    } catch (err) {
      setNotice("");
      setProblem(problemOf(err));
    }
  };

  const flows = new Map<string, Execution["steps"]>();
  for (const s of run?.steps ?? []) flows.set(s.flowId, [...(flows.get(s.flowId) ?? []), s]);

  return (
    <section>
      <p><a href="#/">← runs</a></p>
      <h2>Run <code>{runId}</code></h2>
      <ProblemView problem={problem} />
      {notice && <p class="notice">{notice}</p>}
      {run && (
        <>
          <p>
            <span class={`status ${statusName(run.status)}`} data-run-status={statusName(run.status)}>{statusName(run.status)}</span>{" "}
            {run.planName || run.planId} · {Math.round(run.progress * 100)}% · {age(run.createdAt)} old
            {run.errorReason && <> · <strong>{run.errorReason}</strong> {run.errorMessage}</>}
          </p>
          <div class="actions">
            <button onClick={act("Pause", () => client.pause({ runId }))}>Pause</button>
            <button onClick={act("Resume", () => client.resume({ runId }))}>Resume</button>
            <button onClick={act("Cancel", () => client.cancel({ runId }))}>Cancel</button>
            <button onClick={act("Retry", async () => (await client.retryExecution({ runId }), { message: "retried" }))} disabled={!TERMINAL.has(run.status)}>Retry</button>
          </div>
          {run.pendingClarifications.map((c) => (
            <ClarificationForm runId={runId} c={c} onProblem={setProblem} />
          ))}
          <h3>Graph</h3>
          <div class="graph">
            {[...flows.entries()].map(([flow, steps]) => (
              <div class="flow">
                <div class="flow-name">{flow}</div>
                {steps.map((s) => (
                  <div class={`node ${stepName(s.status)}`}>{s.stepId}</div>
                ))}
              </div>
            ))}
          </div>
          <h3>Steps</h3>
          <table class="steps">
            <thead>
              <tr><th>Step</th><th>Flow</th><th>Tool</th><th>Status</th><th>Attempts</th><th>Duration</th><th>Output</th><th>Error</th></tr>
            </thead>
            <tbody>
              {run.steps.map((s) => (
                <tr data-step={s.stepId}>
                  <td>{s.stepId}</td>
                  <td>{s.flowId}</td>
                  <td>{s.tool}</td>
                  <td class={`step-status ${stepName(s.status)}`}>{stepName(s.status)}</td>
                  <td>{s.attempts}</td>
                  <td>{duration(s.startedAt, s.completedAt)}</td>
                  <td><code>{show(s.output ? valueJson(s.output) : undefined)}</code></td>
                  <td>{s.errorReason && <strong>{s.errorReason}</strong>} {s.error}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
      <h3>Events</h3>
      <ol class="timeline">
        {events.map((ev) => (
          <li>
            <time>{when(ev.timestamp)?.toLocaleTimeString()}</time> {EventType[ev.type]} {ev.stepId} {ev.message}
          </li>
        ))}
      </ol>
    </section>
  );
}

function valueJson(v: { kind: { case?: string; value?: unknown } }): unknown {
  const k = v.kind;
  switch (k.case) {
    case "structValue": {
      const fields = (k.value as { fields: Record<string, typeof v> }).fields;
      return Object.fromEntries(Object.entries(fields).map(([key, f]) => [key, valueJson(f)]));
    }
    case "listValue":
      return (k.value as { values: (typeof v)[] }).values.map(valueJson);
    case "nullValue":
      return null;
    default:
      return k.value;
  }
}

// ---------------------------------------------------------------- the page

function App() {
  const hash = useHash();
  const [epoch, setEpoch] = useState(0);
  const runId = hash.startsWith("#/runs/") ? hash.slice("#/runs/".length) : "";
  return (
    <main>
      <header>
        <h1>Orchestrator</h1>
        <SessionForm onChange={() => setEpoch((n) => n + 1)} />
      </header>
      {!session.tenant ? (
        <p>Enter a tenant to see its runs.</p>
      ) : runId ? (
        <RunPage runId={runId} epoch={epoch} key={runId} />
      ) : (
        <RunList epoch={epoch} />
      )}
    </main>
  );
}

render(<App />, document.getElementById("app")!);
