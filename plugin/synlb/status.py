"""What is running, from the kernel's own counters (no guessing)."""

from __future__ import annotations

import os
import time

import psutil

from . import (conntrack, dataplane, health_state, netfilter, nft_apply, nft_engine, ready, rules, statedir,
               sysctl, workers)
from .config import Config

def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of every thread of ``proc``, to the nanosecond where the
    kernel tells (/proc/PID/task/*/schedstat: time on the CPU), else in
    clock ticks (psutil: 10 ms steps, too coarse for a worker that handled a
    hundred SYNs)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        cpu = proc.cpu_times()
        return cpu.user + cpu.system


def _chain_counters(cfg: Config, counters: dict) -> list[dict]:
    """Per service and family: the iptables chains' counters (nfqueue engine),
    and the nftables engine's named ``counters``."""
    out = []
    for fam in (4, 6):
        try:
            c = netfilter.counters(fam)
        except netfilter.NetfilterError:
            continue
        for svc in cfg.services:
            if fam not in svc.families() or svc.engine != "nfqueue":
                continue
            chain = c.get(rules.vip_chain(svc), [])
            kept = sum(p for p, _, r in chain if f"-j {rules.ESTABLISHED}" in r)
            queued = sum(p for p, _, r in chain if "-j NFQUEUE" in r)
            out.append({"family": fam, "service": svc.name, "chain": rules.vip_chain(svc),
                        "kept_in_kernel_pkts": kept,
                        "kept_in_kernel_bytes": sum(b for _, b, r in chain if f"-j {rules.ESTABLISHED}" in r),
                        "queued_pkts": queued,
                        "queued_bytes": sum(b for _, b, r in chain if "-j NFQUEUE" in r),
                        "saved_marks": sum(p for p, _, _ in c.get(rules.VIPOUT, [])), "engine": "nfqueue"})
    for svc in nft_engine.services(cfg):
        for fam in svc.families():
            def get(kind: str, i: int = 0) -> int:
                return counters.get(nft_engine.counter_name(kind, svc.name, fam), (0, 0))[i]
            out.append({"family": fam, "service": svc.name, "engine": "nftables",
                        "chain": f"{nft_engine.QUALIFIED} {nft_engine.svc_chain(svc.name, fam)}",
                        "kept_in_kernel_pkts": get("kept"), "kept_in_kernel_bytes": get("kept", 1),
                        "queued_pkts": 0, "queued_bytes": 0,
                        "hashed_pkts": get("hashed"), "pinned_pkts": get("pinned"),
                        # pickups without a pin: the configured table, or what this router opened them with
                        "picked_up_pkts": get("pickup") + get("opened"),
                        "no_target_pkts": get("notarget"),
                        "saved_marks": get("hashed") + get("pinned") + get("pickup") + get("opened")})
    out.sort(key=lambda c: (c["service"], c["family"]))
    return out


def _kernel_picks(cfg: Config, counters: dict) -> dict[str, dict[int, int]]:
    """Packets the nftables engine hashed to each target: {service: {mark: packets}}."""
    return {s.name: {t.mark: counters.get(nft_engine.pick_counter(s.name, t.mark), (0, 0))[0]
                     for t in cfg.targets_of(s)} for s in nft_engine.services(cfg)}


def _worker_stats(state_dir: str, queue: int) -> dict:
    return workers.read_stats(state_dir, queue)  # a worker wrote it: read as untrusted input


def _vrrp(cfg: Config) -> dict | None:
    """The last VRRP event recorded for this node, if a [vrrp] section drives it."""
    if cfg.vrrp is None:
        return None
    from .vrrp import journal
    rec = journal.read_state(cfg.globals.state_dir)
    if rec is None:
        return {"state": "UNKNOWN", "source": None, "recorded": None}
    ev = rec["event"]
    return {"state": ev.state, "source": ev.source, "group": f"{ev.kind} {ev.name}",
            "recorded": rec.get("recorded")}


def _ready_file(cfg: Config) -> dict | None:
    """What ``[vrrp] ready_file`` says now (keepalived's view), if there is one."""
    path = cfg.vrrp.ready_file if cfg.vrrp else None
    if path is None:
        return None
    try:
        says = statedir.read_bytes(path).decode("utf-8", "replace").strip()
    except (OSError, ValueError) as e:  # missing, a symlink: keepalived reads 0 from nothing
        says = f"unreadable ({getattr(e, 'strerror', None) or e})"
    return {"path": path, "says": says, "ready": says == ready.READY.decode().strip()}


def collect(cfg: Config) -> dict:
    g = cfg.globals
    applied = dataplane.applied(g.state_dir)
    bound = workers.bound_queues()
    marks = conntrack.count_marks(t.mark for svc in cfg.services for t in cfg.targets_of(svc))
    running = {w.queue: w for w in workers.running(g.state_dir)}
    # one read of the nftables engine's counters (libnftables reads the whole table: ~0.2 s)
    counters = nft_apply.counters() if applied and nft_engine.services(cfg) else {}
    picks = _kernel_picks(cfg, counters)
    services = []
    for svc in cfg.services:
        down = health_state.down_targets(g.state_dir, svc.name)
        queues = []
        for q in svc.queues:
            k = bound.get(q, {})
            w = running.get(q)
            entry = {"queue": q, "bypass": svc.queue_bypass, "listening": bool(k.get("portid")),
                     "waiting": k.get("waiting", 0), "queue_dropped": k.get("queue_dropped", 0),
                     "user_dropped": k.get("user_dropped", 0), "worker": None}
            if w:
                try:
                    p = psutil.Process(w.pid)
                    entry["worker"] = {"pid": w.pid, "cpu_s": round(cpu_seconds(p), 3),
                                       "rss_mb": round(p.memory_info().rss / 2**20, 1),
                                       "packets": _worker_stats(g.state_dir, q).get("packets", 0)}
                except psutil.NoSuchProcess:
                    pass
            queues.append(entry)
        targets = [{"name": t.name, "addresses": [str(a) for a in t.addresses], "mark": t.mark,
                    "table": t.table if svc.mode == "route" else None,
                    "healthy": t.name not in down, "connections": marks.get(t.mark, 0),
                    "kernel_picks": picks.get(svc.name, {}).get(t.mark) if svc.engine == "nftables" else None}
                   for t in cfg.targets_of(svc)]
        services.append({"name": svc.name, "mode": svc.mode, "engine": svc.engine,
                         "vips": [str(v) for v in svc.vips], "queues": queues, "targets": targets})
    return {"time": time.time(), "active": applied is not None, "applied": applied, "vrrp": _vrrp(cfg),
            "ready_file": _ready_file(cfg),
            "sysctl": sysctl.current(), "chains": _chain_counters(cfg, counters) if applied else [],
            "services": services}


def render_text(st: dict) -> str:
    out = [f"synlb: {'active' if st['active'] else 'inactive'}"
           + (f" ({st['applied']['reason']})" if st.get("applied") else "")]
    v = st.get("vrrp")
    if v:
        when = time.strftime("%H:%M:%S", time.localtime(v["recorded"])) if v.get("recorded") else "-"
        out.append(f"vrrp: {v['state']} (last event from {v['source'] or 'nobody yet'} at {when})")
    host = st.get("host")
    if host and host.get("ok"):
        restarts = host.get("plugins", {}).get("lb", {}).get("worker_restarts", {})
        out.append(f"host: running, node {host['node']}, {host['transitions']} transitions, "
                   f"worker restarts {sum(restarts.values())}")
        if host.get("failing"):
            f = host["failing"]
            out.append(f"  RECONCILE FAILING ({f['attempts']} attempts, retry in {f['retry_in']:g} s): "
                       + "; ".join(f["errors"]))
        r = host.get("ready")
        if r:
            out.append("  ready: " + ("yes" if r["ready"] else "NO: " + "; ".join(r["reasons"])))
        for name, pst in sorted(host.get("plugins", {}).items()):
            if name != "lb" and pst.get("summary"):
                out.append(f"  {name}: {pst['summary']}")
    else:
        out.append("host: not running (synlb run)")
    rf = st.get("ready_file")
    if rf:
        out.append(f"ready file: {rf['path']} says {rf['says']} ({'ready' if rf['ready'] else 'NOT READY'})")
    out.append("sysctl: " + " ".join(f"{k}={v}" for k, v in st["sysctl"].items()))
    if st["chains"]:
        out.append("")
        out.append(f"{'chain':<24}{'fam':>4}{'kept in kernel':>16}{'queued':>10}{'marks saved':>13}"
                   + (f"{'hashed in kernel':>18}{'pinned':>8}" if any("hashed_pkts" in c for c in st["chains"])
                      else ""))
        for c in st["chains"]:
            line = (f"{c['chain']:<24}{'v' + str(c['family']):>4}{c['kept_in_kernel_pkts']:>16}"
                    f"{c['queued_pkts'] if c.get('engine') != 'nftables' else '-':>10}{c['saved_marks']:>13}")
            if "hashed_pkts" in c:
                line += f"{c['hashed_pkts']:>18}{c['pinned_pkts']:>8}"
            out.append(line)
    checks = host.get("plugins", {}).get("health", {}).get("targets", {}) if host and host.get("ok") else {}
    for s in st["services"]:
        out.append("")
        nft = s.get("engine") == "nftables"
        out.append(f"service {s['name']} ({s['mode']}, engine {s.get('engine', 'nfqueue')}) "
                   f"vips {', '.join(s['vips'])}")
        out.append(f"  {'target':<16}{'mark':>12}{'table':>12}{'health':>9}{'conns':>8}"
                   + (f"{'hashed':>9}" if nft else "") + "  address")
        for t in s["targets"]:
            picks = t.get("kernel_picks")
            out.append(f"  {t['name']:<16}{t['mark']:>#12x}{str(t['table'] or '-'):>12}"
                       f"{'up' if t['healthy'] else 'DOWN':>9}{t['connections']:>8}"
                       + (f"{'-' if picks is None else picks:>9}" if nft else "")
                       + f"  {', '.join(t['addresses'])}")
            if t["name"] in checks:
                out.append("    " + _health_line(checks[t["name"]]))
        if not s["queues"]:
            continue
        out.append(f"  {'queue':<8}{'listening':>10}{'bypass':>8}{'waiting':>9}{'q-drop':>8}{'u-drop':>8}"
                   f"{'pid':>9}{'cpu s':>9}{'rss MB':>8}{'pkts':>9}")
        for q in s["queues"]:
            w = q["worker"] or {}
            out.append(f"  {q['queue']:<8}{'yes' if q['listening'] else 'NO':>10}{'yes' if q['bypass'] else 'no':>8}"
                       f"{q['waiting']:>9}{q['queue_dropped']:>8}{q['user_dropped']:>8}"
                       f"{w.get('pid', '-'):>9}{w.get('cpu_s', '-'):>9}{w.get('rss_mb', '-'):>8}"
                       f"{w.get('packets', '-'):>9}")
    return "\n".join(out)


def _health_line(h: dict) -> str:
    """One target's check and transition history, from the health plugin's status."""
    def hms(t: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(t))
    last = h.get("last") or {}
    line = f"check {h['check']}: {h['state']} since {hms(h['since'])}"
    if h["check"] != "none":
        line += (f", recent [{h['recent']}], {h['successes']} ok/{h['failures']} failed in a row "
                 f"(rise {h['rise']}, fall {h['fall']})")
        if last:
            line += f", last: {last['detail']}"
    hist = ", ".join(f"{hms(e['time'])} {e['state']}" + (f" ({e['detail']})" if e["state"] == "down" else "")
                     for e in h.get("history", [])[-5:])
    return f"{line}; history: {hist}"
