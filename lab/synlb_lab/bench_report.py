"""Bench results -> ``latest.json``, ``latest.md``, ``latest.png`` (pure, apart
from writing the files; the chart needs the optional ``bench`` extra, i.e.
matplotlib, and is skipped with a note when it is missing)."""

from __future__ import annotations

import json
import os
from typing import Any

LABELS = {
    "throughput_ratio": "Established throughput, SYN-only / plain routing",
    "ct_alone_throughput_ratio": "Established throughput, conntrack alone (no synlb) / plain routing",
    "no_vip_throughput_ratio": "Established throughput, synlb up but traffic not to the VIP / plain routing",
    "host_throughput_ratio": "Established throughput, SYN-only under synlb run / plain routing",
    "all_packets_ratio": "Established throughput, all-packets / plain routing",
    "conn_rate_ratio": "New connections/s, synlb / kernel HMARK",
    "conn_rate_ratio_multiqueue": "New connections/s, synlb 2 queues / kernel HMARK",
    "throughput_per_cpu_ratio": "Established throughput per CPU the lab used, SYN-only / plain",
    "conn_per_cpu_ratio": "New connections per CPU the lab used, synlb / HMARK",
    "conn_per_cpu_ratio_multiqueue": "New connections per CPU the lab used, 2 queues / HMARK",
    "cpu_us_per_conn": "Worker CPU per new connection, router links NIC-like (us)",
    "cpu_us_per_conn_veth": "Worker CPU per new connection, plain veth links (us)",
    "conn_rate_ratio_nic": "New connections/s, synlb / kernel HMARK, router links NIC-like",
    "worker_rss_mb": "Worker RSS (MB)",
    "maglev_build_ms_100": "Maglev build, 100 targets, M=65537 (ms)",
    "failover_gap_s": "Failover gap: data held up at most, all sessions (s)",
    "failover_longest_interarrival_s": "Longest time between two deliveries, incl. the sessions' own pauses (s)",
    "sessions_kept_ratio": "Sessions kept over the failovers",
    "pins_normal_path_ratio": "Worker per-packet cost with no pins / before pins existed",
    "pickup_normal_path_ratio": "Worker per-packet cost, no target down / before pickups followed the configured table",
    "pins_us_per_conntrack_entry": "Sync: conntrack read + misplaced check per entry (us)",
    "nft_conn_rate_ratio": "New connections/s, nftables engine / kernel HMARK (ratio of medians)",
    "nft_throughput_ratio": "Established throughput, nftables engine / plain routing (ratio of medians)",
    "nft_update_ms_100": "nftables engine: health flip, 100 targets, M=65537, applied in (ms, median)",
    "nft_update_ms_100_max": "nftables engine: health flip, slowest (ms)",
    "nft_connections_failed_in_update": "nftables engine: new connections failed during the flips",
    "nft_user_space_packets": "nftables engine: packets queued to user space (conn/s runs)",
    "nft_failover_gap_s": "Failover gap, nftables engine (s)",
    "nft_sessions_kept_ratio": "Sessions kept over the failovers, nftables engine",
    "nfqueue_cpu_vs_c": "Worker CPU per new connection, Python / C reference, NIC-like links (ratio of medians)",
    "nfqueue_cpu_vs_c_veth": "Worker CPU per new connection, Python / C reference, plain veth links",
    "nfqueue_conn_rate_vs_c": "New connections/s, Python worker / C reference (ratio of medians)",
    "cref_cpu_us_per_conn": "C reference worker CPU per new connection, NIC-like links (us)",
    "nfqueue_floor_cpu_vs_c": "CPU per new connection, least Python netfilterqueue worker / C reference, NIC-like",
    "nfqueue_jhash_cpu_vs_c": "Worker CPU per new connection with flow_hash = jhash (the kernel's slot), Python / C, NIC-like",
    "drift_check_cpu_pct_3": "Host drift check once a second, 3 targets (% of one CPU)",
    "drift_check_cpu_pct_100": "Host drift check once a second, 100 targets (% of one CPU)",
}


TARGET_LIMITS = {"cpu_us_per_conn": 10.0}


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def write_reports(res: dict, out_dir: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "latest.json"),
             "md": os.path.join(out_dir, "latest.md"),
             "png": os.path.join(out_dir, "latest.png")}
    chart_note = write_chart(res, paths["png"])
    res["chart"] = os.path.basename(paths["png"]) if chart_note is None else None
    if chart_note:
        res["chart_note"] = chart_note
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, paths["json"])
    with open(paths["md"], "w") as fh:
        fh.write(render_markdown(res))
    return paths


# ---------------------------------------------------------------- summary

def summary_lines(res: dict) -> list[str]:
    out = [f"synlb bench {res.get('date')} on {res['machine'].get('hostname')} "
           f"({res['machine'].get('cpus')} CPUs){' QUICK' if res.get('quick') else ''}"]
    for key, t in res.get("targets", {}).items():
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        out.append(f"  {key:22s} {_fmt(t['value']):>10s}  target {t['target']:>8s}  {mark}")
    mq = res.get("conn_rate_ratio_multiqueue")
    out.append(f"  {'conn_rate_ratio (2 q)':22s} {_fmt(mq):>10s}")
    out.append(f"  {'all_packets_ratio':22s} {_fmt(res.get('all_packets_ratio')):>10s}")
    return out


# ---------------------------------------------------------------- markdown

def _why(key: str, res: dict) -> str:
    """Why a target is missed, from the measurements of this run."""
    sr = res.get("single_router", {})
    cr = sr.get("conn_rate", {})
    tp = sr.get("throughput", {})
    prof = cr.get("profile") or {}
    if key == "cpu_us_per_conn":
        cpu = cr.get("cpu_us_per_conn", {})
        user = cr.get("worker_user_us_per_conn", {}).get("synlb_nic")
        system = cr.get("worker_sys_us_per_conn", {}).get("synlb_nic")
        txt = (f"user {_fmt(user)} us + system {_fmt(system)} us per connection, measured with psutil "
               "while the router's links hand packets over like NICs (threaded NAPI on the switch "
               "side, see nic_like_wire in bench.py). On plain veth links the worker is charged "
               f"{_fmt(cpu.get('synlb'))} us: the verdict syscall that re-injects the SYN then also "
               "runs the switch and the target's and client's TCP stacks in softirq.")
        if prof.get("user_space_pct") is not None and cpu.get("synlb_nic"):
            t = cpu["synlb_nic"]
            txt += (f" perf, NIC-like links: user space {prof['user_space_pct']:.0f}% of the "
                    f"worker's samples (about {_fmt(t * prof['user_space_pct'] / 100)} us), the "
                    f"verdict syscall {prof['verdict_syscall_pct']:.0f}%, of which the kernel "
                    f"forwarding the accepted SYN (`nfqnl_reinject`: routing by mark, FORWARD, "
                    f"conntrack confirm, transmit) {prof.get('reinject_pct', 0):.0f}% (about "
                    f"{_fmt(t * prof.get('reinject_pct', 0) / 100)} us: work a router does for "
                    f"every new connection, with or without synlb), the recv syscall "
                    f"{prof['recv_syscall_pct']:.0f}%.")
        hp = res.get("hotpath", {})
        if hp.get("current_us_per_packet"):
            txt += (f" The Python callback itself takes {hp['current_us_per_packet']:.2f} us per packet "
                    "with warm caches (hot path below); the rest of the user time is netfilterqueue "
                    "and libnetfilter_queue (a Packet object, message parsing) and cold caches after "
                    "each wake-up. At this rate every SYN wakes the worker on its own: one recv and "
                    "one verdict syscall per packet, nothing to amortize. This 2-vCPU VM is also "
                    "slow: kernel-only HMARK makes about "
                    f"{_fmt(cr.get('median', {}).get('hmark'))} conn/s in this lab, where the first "
                    "lab measured 22.7k (docs/DESIGN-NOTES.md; the first Python worker's 21 us there). "
                    "What would "
                    "cut it further is not in Python: batched verdicts (netfilterqueue has none) or "
                    "a worker in C.")
        return txt
    if key == "conn_rate_ratio":
        pc = res.get("conn_per_cpu_ratio")
        rm = cr.get("ratio_of_medians", {}).get("synlb")
        rs = cr.get("ratios", {}).get("synlb") or [0]
        noisy = cr.get("noisy", {}).get("synlb")
        return ("the lab's 2 CPUs are shared by wrk, three nginx, the router and the worker; every "
                "new connection costs the worker a wake-up, a recv, the Python callback and "
                "a verdict syscall that HMARK does not need, so the rate falls by about the "
                "worker's own share of the CPUs. "
                + f"Per-round ratios {min(rs):.2f}..{max(rs):.2f}; "
                + (f"ratio of the medians {_fmt(rm)}; " if rm else "")
                + (f"per CPU the lab used, {_fmt(pc)}. " if pc else "")
                + ("The figure sits at the target within the spread of the measurement. "
                   if (res.get("targets", {}).get(key, {}).get("missed_by_pct") or 100) < 5 else "")
                + ("Most rounds were disturbed by other load on the machine (see the section below): "
                   "the raw ratio is mostly noise." if noisy else ""))
    if key == "throughput_ratio":
        pc = res.get("throughput_per_cpu_ratio")
        noisy = tp.get("noisy", {}).get("syn_only")
        ct = tp.get("ratio", {}).get("conntrack_only")
        rm = tp.get("ratio_of_medians", {}).get("syn_only")
        rs = tp.get("ratios", {}).get("syn_only") or [0]
        return ("SYN-only adds conntrack and the mangle chains (CONNMARK restore, conntrack and "
                "connmark matches) to every established packet; plain routing has no netfilter at "
                "all in the router"
                + (f"; conntrack alone (synlb up, traffic not to the VIP) gives {_fmt(ct)}" if ct else "")
                + f". iperf3 through this VM's veths swings by tens of percent from run to run even "
                f"on an idle machine (per-round ratios {min(rs):.2f}..{max(rs):.2f}); the ratio of the "
                f"medians is {_fmt(rm)}. "
                + (f"Per CPU the lab used: {_fmt(pc)}. " if pc else "")
                + ("Most rounds were disturbed by other load on the machine: the ratio is mostly "
                   "noise." if noisy else ""))
    if key == "worker_rss_mb":
        return ("the worker is a CPython process with netfilterqueue, the config and Maglev "
                "modules and two 65537-entry lists (table and marks).")
    if key == "failover_gap_s":
        fo = res.get("failover", {})
        return (f"the VRRP takeover alone took {_fmt(fo.get('median_takeover_s'))} s (median; the "
                "backup declares the master dead after 3 x advert_int + skew), and a segment lost "
                "when the links went down is only re-sent on TCP's timers (tail loss probe about "
                "0.2 s after the loss, then the RTO doubling from 0.2 s): a session whose first "
                "re-send still met the dead router waits for the next one. "
                f"Data held up per pattern: {_per_pattern(fo, 'delays')}. The gap is set by "
                "keepalived's detection and TCP's retransmission schedule, not by anything synlb "
                "does after the takeover (the first packet of each picked-up session is marked "
                "within the worker's microseconds); every session stayed on its target.")
    if key == "sessions_kept_ratio":
        fo = res.get("failover", {})
        errs = [e.get("errors") for e in fo.get("events", []) if e.get("errors")]
        return f"sessions lost or moved; errors: {errs}"
    if key == "maglev_build_ms_100":
        return "the population loop is pure Python."
    if key in ("nft_update_ms_100", "nft_update_ms_100_max"):
        nu = sr.get("nft_update", {})
        mg = res.get("maglev", {}).get("build_ms", {}).get("100", {}).get("median_ms")
        return (f"the kernel's part (one transaction of the ~1% of slots that differ) took "
                f"{_fmt(nu.get('median_kernel_ms'))} ms (median); the rest is synlb's Python: the Maglev "
                f"table rebuilt for the new target set ({_fmt(mg)} ms on an idle CPU, maglev section), "
                "the diff against the applied slots and the records written. The flips run while wrk "
                "keeps both CPUs of this VM busy (the point is no failed connection during them), so "
                "synlb gets a share of a CPU, not a whole one: the slowest flips are the ones that "
                "waited for a CPU (see the nice = 0 series in the nft_update section).")
    if key == "nft_throughput_ratio":
        rs = tp.get("ratios", {}).get("nft") or [0]
        ct = tp.get("ratio_of_medians", {}).get("conntrack_only")
        ft = tp.get("flowtable") or {}
        return (f"per-round ratios {min(rs):.2f}..{max(rs):.2f} against plain; the conntrack_only arm (synlb "
                f"up, iperf3 to a target, not through the VIP: conntrack and nothing of synlb's on the path) "
                f"comes out at {_fmt(ct)}. The cost is conntrack's own per-packet work, which the engine needs: "
                "the conntrack mark is what keeps a running connection on its target when the table changes. "
                "The usual way past it, an nftables flowtable fast path for established flows, "
                + ("is in this kernel: not used yet." if ft.get("supported") else
                   f"is not in this kernel (probe: {ft.get('error') or 'refused'})."))
    if key == "nft_conn_rate_ratio":
        sec, base = cr, "hmark"
        rs = sec.get("ratios", {}).get("nft") or [0]
        return (f"per-round ratios {min(rs):.2f}..{max(rs):.2f} against {base}: the engine adds a ct "
                "mark test to every packet of the service and a jhash and map lookup to each one "
                "without a mark, all in the kernel; what is left is inside this VM's run-to-run noise "
                "(see the sections below).")
    if key == "nfqueue_cpu_vs_c":
        u = cr.get("worker_user_us_per_conn", {})
        sy = cr.get("worker_sys_us_per_conn", {})
        return (f"user time per connection: Python worker {_fmt(u.get('synlb_nic'))} us, C reference "
                f"{_fmt(u.get('cref_nic'))} us; system time {_fmt(sy.get('synlb_nic'))} us against "
                f"{_fmt(sy.get('cref_nic'))} us (the same two syscalls per packet). The difference is the "
                "interpreter: netfilterqueue's Packet object, the callback and the hash call. The floor "
                f"worker (netfilterqueue, a callback that only indexes the mark table by the client's port) "
                f"costs {_fmt(res.get('nfqueue_floor_cpu_vs_c'))} x the C reference (user "
                f"{_fmt(u.get('floor_nic'))} us, system {_fmt(sy.get('floor_nic'))} us): what is left for "
                "synlb's own code (flow key, keyed hash, pins) is the rest.")
    if key == "nfqueue_jhash_cpu_vs_c":
        u = cr.get("worker_user_us_per_conn", {})
        return (f"user time per connection: Python worker {_fmt(u.get('synlb_jhash_nic'))} us, C reference "
                f"{_fmt(u.get('cref_jhash_nic'))} us; both read the slot the kernel put in the packet's mark.")
    if key == "nfqueue_conn_rate_vs_c":
        v = cr.get("vs_c", {}).get("conn_rate", {})
        return (f"per-round ratios {v.get('ratios', {}).get('synlb')}: the worker's extra user time per "
                "SYN is time the CPUs do not spend on the other hosts of this 2-CPU lab.")
    return ""


def _per_pattern(fo: dict, field: str) -> str:
    """``echo_v4 0.21..0.23 s, ...``: the spread of one per-pattern figure over the failovers."""
    per: dict[str, list[float]] = {}
    for e in fo.get("events", []):
        for k, v in e.get(field, {}).items():
            per.setdefault(k, []).append(v)
    return ", ".join(f"{k} {min(v):.2f}..{max(v):.2f} s" for k, v in sorted(per.items()))


def _estimates_line(sec: dict, arms: tuple, base: str) -> str:
    rm = sec.get("ratio_of_medians", {})
    parts = [f"{a} {_fmt(rm.get(a))}" for a in arms if rm.get(a) is not None]
    if not parts:
        return ""
    return (f"Ratio of the medians (median of the arm's runs / median of the {base} runs of the same "
            f"rounds; steadier when the noise is run to run): {', '.join(parts)}.")


def _noise_line(sec: dict, arm: str) -> str:
    runs = sec.get("runs", [])
    rounds = {(r["block"], r["round"]): r["quiet_round"] for r in runs}
    disturbed = sum(1 for q in rounds.values() if not q)
    shares = [r.get("foreign_share", 0) for r in runs]
    txt = (f"Rounds disturbed by the rest of the machine (other processes above "
           f"{100 * 0.15:.0f}% of the CPUs during a run): {disturbed} of {len(rounds)}; "
           f"their load during the runs: {100 * min(shares, default=0):.0f}..{100 * max(shares, default=0):.0f}%. ")
    if sec.get("noisy", {}).get(arm):
        txt += ("Too few undisturbed rounds: the ratios above use every round and are noisy "
                f"(all rounds: {sec.get('ratios_all', {})}).")
    else:
        txt += f"Ratios use the undisturbed rounds only (all rounds: {sec.get('ratios_all', {})})."
    return txt


def render_markdown(res: dict) -> str:
    m = res.get("machine", {})
    L: list[str] = []
    add = L.append
    add(f"# synlb benchmark{' (quick mode: short runs, not for reporting)' if res.get('quick') else ''}")
    add("")
    add(f"- date: {res.get('date')}")
    add(f"- machine: {m.get('hostname')}, {m.get('cpu_model')}, {m.get('cpus')} CPUs, "
        f"{m.get('memory_gb')} GB, Linux {m.get('kernel')}, Python {m.get('python')}")
    add(f"- commit: {m.get('commit')}; load average before: {m.get('load_before')}; "
        f"run took {res.get('elapsed_s')} s")
    add("- every ratio is the median of per-round ratios, each against a baseline measured "
        "right next to it (arms alternate, order reversed every other round)")
    add("")
    add("## Headline")
    add("")
    add("| figure | value | target | |")
    add("|---|---:|---:|---|")
    fo = res.get("failover") or {}
    for key, t in res.get("targets", {}).items():
        met = {True: "met", False: f"**missed** by {t.get('missed_by_pct')}%", None: "n/a"}[t["met"]]
        val = _fmt(t["value"])
        if key == "sessions_kept_ratio" and fo.get("sessions"):
            val = f"{fo['kept']}/{fo['sessions']}"
        fon = res.get("failover_nft") or {}
        if key == "nft_sessions_kept_ratio" and fon.get("sessions"):
            val = f"{fon['kept']}/{fon['sessions']}"
        add(f"| {LABELS.get(key, key)} | {val} | {t['target']} | {met} |")
    for key in ("cpu_us_per_conn_veth", "conn_rate_ratio_nic", "cref_cpu_us_per_conn", "nfqueue_cpu_vs_c_veth",
                "nfqueue_floor_cpu_vs_c",
                "nft_update_ms_100_max", "nft_failover_gap_s", "drift_check_cpu_pct_3", "drift_check_cpu_pct_100",
                "all_packets_ratio", "conn_rate_ratio_multiqueue", "throughput_per_cpu_ratio",
                "conn_per_cpu_ratio", "conn_per_cpu_ratio_multiqueue"):
        add(f"| {LABELS.get(key, key)} | {_fmt(res.get(key))} | (comparison) | |")
    add("")
    missed = [(k, t) for k, t in res.get("targets", {}).items() if t["met"] is False]
    if missed:
        add("### Targets missed, by how much and why")
        add("")
        for k, t in missed:
            add(f"- **{k}** = {_fmt(t['value'])} (target {t['target']}, missed by "
                f"{t['missed_by_pct']}%): {_why(k, res)}")
        add("")
    if res.get("chart"):
        add(f"![chart]({res['chart']})")
        add("")
    elif res.get("chart_note"):
        add(f"(chart: {res['chart_note']})")
        add("")

    sr = res.get("single_router", {})
    tp = sr.get("throughput")
    if tp:
        plan = res.get("plan", {})
        add("## Established throughput (iperf3)")
        add("")
        nr = len({r["round"] for r in tp["runs"]})
        add(f"iperf3 client -> lb1 -> t1, {plan.get('tput_streams')} streams, "
            f"{plan.get('tput_seconds')} s (first {plan.get('tput_omit')} s omitted), "
            f"{nr} rounds. plain: synlb down, to t1's address (no netfilter in the router); "
            "conntrack_only: synlb up, to t1's address (conntrack and the mangle hooks run, none of "
            "synlb's rules match): what conntrack alone costs; syn_only and all_packets: synlb up, "
            "to the VIP (service `ipf`, target t1); nft: the same with `engine = nftables` (the "
            "Maglev table in a kernel map, no worker).")
        add("")
        pc = tp.get("per_cpu", {})
        add("| arm | median Gbit/s | ratio to plain (median) | per-round ratios used | Gbit/s per lab CPU | "
            "ratio per lab CPU | packets queued (median) |")
        add("|---|---:|---:|---|---:|---:|---:|")
        for arm in ("plain", "conntrack_only", "syn_only", "nft", "all_packets"):
            q = [r["queued_packets"] for r in tp["runs"] if r["arm"] == arm]
            if not q:
                continue
            base = 1.0 if arm == "plain" else None
            add(f"| {arm} | {_fmt(tp['median'].get(arm))} | {_fmt(tp['ratio'].get(arm, base))} "
                f"| {tp['ratios'].get(arm, '')} | {_fmt(pc.get('median', {}).get(arm))} "
                f"| {_fmt(pc.get('ratio', {}).get(arm, base))} | {int(sorted(q)[len(q) // 2]) if q else 0} |")
        add("")
        allp = [r for r in tp["runs"] if r["arm"] == "all_packets"]
        if allp:
            secs = plan.get("tput_seconds", 10) + plan.get("tput_omit", 0)
            mid = sorted(allp, key=lambda r: r.get("queue_entries", 0))[len(allp) // 2]
            drops = sum(r.get("queue_dropped", 0) + r.get("user_dropped", 0) for r in allp)
            if mid.get("queue_entries"):
                add(f"All-packets mode: the rule sent {mid['queued_packets']:,} packets to the queue "
                    f"in a run, {mid['queue_entries']:,} queue entries once the kernel had segmented "
                    f"the GSO ones (netfilterqueue cannot take GSO packets whole): the worker "
                    f"verdicted about {mid['queue_entries'] / secs:,.0f} packets/s; {drops} dropped by a "
                    "full queue or socket over all rounds. TCP slows down to what one Python worker "
                    "can verdict.")
                add("")
        add(_noise_line(tp, "syn_only"))
        add("")
        add(_estimates_line(tp, ("syn_only", "nft", "conntrack_only", "all_packets"), "plain"))
        add("")
    cr = sr.get("conn_rate")
    if cr:
        plan = res.get("plan", {})
        add("## New connections per second (wrk, `Connection: close`)")
        add("")
        nr = {b: len({r["round"] for r in cr["runs"] if r["block"] == b})
              for b in ("synlb", "synlb_mq", "synlb_nic")}
        add(f"wrk -t{plan.get('wrk_threads')} -c{plan.get('wrk_connections')} "
            f"-d{plan.get('conn_seconds')}s against nginx on t1..t3 through the VIP, "
            f"{nr['synlb']} rounds against synlb, {nr['synlb_mq']} against synlb with 2 queues and "
            f"{nr['synlb_nic']} with the router's links NIC-like. hmark: the NFQUEUE rule replaced by "
            "`HMARK --hmark-tuple src,dst,sport,dport --hmark-mod 3` into the same marks "
            "(same chains, CONNMARK, ip rules); synlb: one queue; synlb_mq: `queue = 0-1` "
            "(two workers, `--queue-balance 0:1 --queue-cpu-fanout`); synlb_nic and hmark_nic: "
            "the same two arms after the router's links were made to hand packets over like NICs "
            "(threaded NAPI on the switch side, TSO off on the router), so that the other hosts' "
            "packet processing no longer runs inside the worker's syscalls. cref and cref_nic: "
            "the reference C worker (bench/cref/synlb-cref.c: the same hash, key, mark table, copy "
            "range and one recv and one verdict per packet) on a queue of its own, the chain's "
            "NFQUEUE rule pointed at it. nft: `engine = nftables`, the same Maglev table in a "
            "kernel map, no worker. floor_nic: the least Python worker on netfilterqueue "
            "(lab/synlb_lab/pyfloor.py). The *_jhash_nic arms: a block of their own, NIC-like links, "
            "with `flow_hash = jhash`: the kernel puts each new connection's slot in the packet's "
            "mark, synlb's worker and the C reference (`--slot-base`) only look it up.")
        add("")
        pc = cr.get("per_cpu", {})
        add("| arm | median conn/s | ratio to hmark (median) | per-round ratios used | conn/s per lab CPU | "
            "ratio per lab CPU | worker CPU us/conn (user + sys) | worker RSS MB | packets queued per conn |")
        add("|---|---:|---:|---|---:|---:|---:|---:|---:|")
        for arm in ("hmark", "synlb", "cref", "nft", "synlb_mq", "hmark_nic", "synlb_nic", "cref_nic", "floor_nic",
                    "hmark_jhash_nic", "synlb_jhash_nic", "cref_jhash_nic"):
            if arm not in cr["median"]:
                continue
            cpu = cr.get("cpu_us_per_conn", {}).get(arm)
            u = cr.get("worker_user_us_per_conn", {}).get(arm)
            s = cr.get("worker_sys_us_per_conn", {}).get(arm)
            cpu_txt = f"{_fmt(cpu)} ({_fmt(u)} + {_fmt(s)})" if cpu is not None else "-"
            base = 1.0 if arm.startswith("hmark") else None
            add(f"| {arm} | {_fmt(cr['median'].get(arm))} | {_fmt(cr['ratio'].get(arm, base))} "
                f"| {cr['ratios'].get(arm, '')} | {_fmt(pc.get('median', {}).get(arm))} "
                f"| {_fmt(pc.get('ratio', {}).get(arm, base))} | {cpu_txt} "
                f"| {_fmt(cr.get('worker_rss_mb', {}).get(arm, None))} "
                f"| {_fmt(cr.get('queued_per_conn', {}).get(arm))} |")
        add("")
        add(_noise_line(cr, "synlb"))
        add("")
        add(_estimates_line(cr, ("synlb", "cref", "nft", "synlb_mq"), "hmark"))
        add("")
        vs = cr.get("vs_c") or {}
        if vs:
            add("Python worker against the C reference, same rounds: "
                + "; ".join(f"{what} ratio of medians {_fmt(v.get('ratio_of_medians', {}).get(arm))}, "
                            f"median of per-round ratios {_fmt(v.get('ratio', {}).get(arm))} "
                            f"(rounds {v.get('ratios', {}).get(arm)})"
                            for what, v, arm in (("conn/s", vs.get("conn_rate", {}), "synlb"),
                                                 ("CPU per connection, plain veth", vs.get("cpu_veth", {}),
                                                  "synlb"),
                                                 ("CPU per connection, NIC-like", vs.get("cpu_nic", {}),
                                                  "synlb_nic"),
                                                 ("CPU per connection, NIC-like, floor worker",
                                                  vs.get("cpu_nic", {}), "floor_nic"),
                                                 ("CPU per connection, NIC-like, flow_hash = jhash (both workers)",
                                                  vs.get("cpu_nic_jhash", {}), "synlb_jhash_nic")))
                + ". Both hash alike (checked on IPv4 and IPv6 keys before the runs), so they pick the "
                  "same targets.")
            add("")
        if cr.get("nft_queued_packets") is not None:
            add(f"nftables engine: {cr['nft_queued_packets']} packets reached a queue in its runs, "
                f"{cr.get('nft_workers', 0)} workers ran: no user space on its packet path.")
            add("")
        add("Per lab CPU: each run's rate divided by the CPUs the lab used during it (its "
            "processes, the wrk/iperf3 clients, ksoftirqd). The lab alone keeps both CPUs busy, so "
            "this is the rate it would reach with the machine to itself; other load on the machine "
            "hardly moves it, while it moves the raw rates a lot.")
        cr_range = cr.get("copy_range", {}).get("synlb") or {}
        add(f"Kernel copy range of the worker's queue (bytes of each packet copied to user space): "
            f"{', '.join(str(v) for v in cr_range.values()) or 'n/a'}.")
        prof = cr.get("profile")
        if prof:
            add("")
            add(f"perf profile of the worker (one extra synlb run, NIC-like links): "
                f"{prof['user_space_pct']:.0f}% of its samples are user space (Python, netfilterqueue, "
                f"libc), {prof['verdict_syscall_pct']:.0f}% under the verdict syscall, of which "
                f"{prof.get('reinject_pct', 0):.0f}% the kernel forwarding the accepted SYN "
                f"(`nfqnl_reinject`), {prof['recv_syscall_pct']:.0f}% under the recv syscall, "
                f"{prof['softirq_in_worker_pct']:.0f}% softirq packet processing (`net_rx_action`) "
                "that still ran in its context.")
        add("")
    nu = sr.get("nft_update")
    if nu:
        add(f"## nftables engine: a health flip with {nu['targets']} targets (M = {nu['table_size']})")
        add("")
        add(f"`synlb up` after the down set changed (one target out, then back), as the host applies "
            f"it: only the slots that differ, in one nftables transaction, while wrk opens new "
            f"connections through the VIP all along. First install of the table: {nu['first_up_s']} s.")
        add("")
        add("| nice | down | slots changed | kernel transaction ms | applied in ms |")
        add("|---|---|---:|---:|---:|")
        for f in nu["flips"]:
            nice = nu.get("nice") if f.get("nice", "default") == "default" else f["nice"]
            add(f"| {nice} | {', '.join(f['down']) or '(none)'} | {f['slots']} | {f['kernel_ms']:.0f} | "
                f"{f['total_ms']:.0f} |")
        add("")
        w = nu.get("wrk") or {}
        add(f"At the shipped `[synlb] nice` ({nu.get('nice')}): median {_fmt(nu['median_total_ms'])} ms, slowest "
            f"{_fmt(nu['max_total_ms'])} ms.")
        n0 = nu.get("nice_0")
        if n0:
            add(f"At `nice = 0`, level with wrk and nginx (which share this VM's two CPUs, as no load generator "
                f"shares a router's): median {_fmt(n0['median_total_ms'])} ms, slowest {_fmt(n0['max_total_ms'])} ms.")
        add(f"wrk meanwhile: {w.get('requests')} connections, errors {w.get('errors')}, non-2xx "
            f"{w.get('non2xx')}: {nu['connections_failed']} failed.")
        add("")
    for key, title in (("failover", "Failover (2 routers, keepalived, synlb hot standby on both)"),
                       ("failover_nft", "Failover, nftables engine (the same, `engine = nftables`)")):
        fo = res.get(key)
        if fo:
            _render_failover(add, res, fo, title)
    dr = res.get("drift")
    if dr:
        add("## The host's drift check")
        add("")
        add("`dataplane.drift` (what `synlb run` compares once a second while active, and `status --check` "
            "prints) on an installed data plane that has not drifted, in the router's namespace; per call:")
        add("")
        add("| engine, targets | CPU ms | in children (iptables-save, nft) ms | wall ms | % of one CPU at 1/s |")
        add("|---|---:|---:|---:|---:|")
        for k, v in dr.items():
            add(f"| {k.replace('_', ', ')} | {v['cpu_ms']} | {v['children_cpu_ms']} | {v['wall_ms']} "
                f"| {v['cpu_share_at_1s_pct']} |")
        add("")
    mg = res.get("maglev")
    if mg:
        add(f"## Maglev table build (M = {mg['table_size']})")
        add("")
        add("| targets | median ms | min ms |")
        add("|---:|---:|---:|")
        for n, v in mg["build_ms"].items():
            add(f"| {n} | {v['median_ms']} | {v['min_ms']} |")
        add("")
    hp = res.get("hotpath")
    if hp:
        add("## Worker hot path (Python only, stub packets)")
        add("")
        add(f"`Worker.on_packet` on {hp['packets']} stub packets ({hp['mix']}), best of 10 batches "
            "alternating with the reference callback (the hot path as first written): "
            f"**{hp['current_us_per_packet']} us** per packet; the reference: {hp['seed_us_per_packet']} us. "
            "Both give the same mark for every packet checked.")
        if hp.get("kernel_jhash_us_per_packet"):
            add("")
            add(f"The same callback hashing with the nftables engine's kernel jhash (pure Python, same "
                f"5-tuple layout, seed and reciprocal_scale): {hp['kernel_jhash_us_per_packet']} us per "
                f"packet, {hp['kernel_jhash_extra_pct']:+.0f} % of the worker's CPU per packet "
                "(docs/ENGINES.md: the engines keep separate hashes).")
        add("")
    pn = res.get("pins")
    if pn:
        hp2, ct, up = pn["hotpath"], pn["conntrack"], pn["unreachable_peer"]
        us = hp2["us_per_packet"]
        add("## Pins (sessions kept across target changes)")
        add("")
        add(f"Worker callback per packet (stub packets, {hp2['packets_per_arm']} per arm, rounds alternating): "
            f"before pins {us['before']} us, with no pins **{us['no_pins']} us** (median ratio "
            f"{hp2['no_pins_vs_before']}, rounds {hp2['no_pins_vs_before_spread'][0]}-"
            f"{hp2['no_pins_vs_before_spread'][1]}), 10 000 pins none matching {us['10k_pins_miss']} us, "
            f"a packet following its pin {us['pinned_hit']} us.")
        add("")
        add("| what | figure |")
        add("|---|---:|")
        for n, v in pn["misplaced"].items():
            add(f"| misplaced check, {n} entries (two thirds move) | {v['us_per_entry']} us/entry, "
                f"{v['seconds']} s |")
        add(f"| conntrack read + check, {ct['entries']} real entries | {ct['us_per_entry']} us/entry "
            f"(dump {ct['dump_s']} s, check {ct['misplaced_s']} s) |")
        add(f"| worker memory | {pn['memory']['bytes_per_pin']} bytes/pin |")
        add(f"| on the wire | {pn['message']['bytes_per_pin']} bytes/pin; 10 000 pins encode "
            f"{pn['message']['encode_ms']} ms, decode {pn['message']['decode_ms']} ms |")
        add(f"| a round with one silent peer (timeout {up['timeout_s']} s) | {up['round_s']} s; the reachable "
            f"peer's pins after {up['reachable_peer_answered_after_s']} s |")
        add("")
    add("How to run and read this report, and what was tried to make synlb fast: "
        "[bench/README.md](../README.md).")
    add("")
    return "\n".join(L)


def _render_failover(add, res: dict, fo: dict, title: str) -> None:
    add(f"## {title}")
    add("")
    add(f"The shipped keepalived configuration (conf/keepalived.conf.example: advert_int "
        f"{fo['advert_int']} s, preempt_delay) with the notify hook, synlb hot standby on both "
        f"routers; per failover {res.get('plan', {}).get('sessions_per_pattern')} sessions of "
        "each pattern and IP family through the VIP (echo: the client sends a line and waits "
        "for it back; push: the server sends a line after each pause; down: the server streams "
        "chunks); the master's front and back links go down, and come back (fail back) before "
        "the next round; the figures cover both moves. A session is kept if it never failed, "
        "resumed within the stall limit and stayed on its target.")
    add("")
    pats = list(fo.get("patterns") or {})
    cols = [f"{p}_v{f}" for p in pats for f in (4, 6)]
    add("| # | VRRP takeover s | fail back s | data held up s | "
        + " | ".join(c.replace("_", " ") for c in cols)
        + " | longest time between deliveries s | kept | moved |")
    add("|" + "---:|" * (6 + len(cols)))
    for e in fo["events"]:
        d = e.get("delays", {})
        add(f"| {e['index']} | {e['takeover_s']:.2f} | {_fmt(e.get('takeover_back_s'))} "
            f"| {_fmt(e.get('max_delay_s'))} | " + " | ".join(_fmt(d.get(c)) for c in cols)
            + f" | {_fmt(e.get('max_gap_s'))} | {e['kept']}/{e['sessions']} | {e['moved']} |")
    add("")
    pauses = ", ".join(f"{p} {iv:g} s" for p, iv in (fo.get("patterns") or {}).items())
    add(f"Data held up at most {_fmt(fo.get('max_delay_s'))} s (target <= 3 x advert_int + 0.3 = "
        f"{3 * fo['advert_int'] + 0.3:.2f} s); kept {fo['kept']}/{fo['sessions']}. "
        "Held up: for each message, arrival minus send time (echo: reply minus request; push "
        "and download: the server's send stamp; the lab shares one clock), so a failover that "
        "falls in a session's idle pause costs it nothing. The longest time between two "
        f"deliveries ({_fmt(fo.get('max_gap_s'))} s) also counts each pattern's own pause "
        f"({pauses}); per pattern: {_per_pattern(fo, 'gaps')}.")
    add("")


# ---------------------------------------------------------------- chart

def write_chart(res: dict, path: str) -> str | None:
    """The PNG; returns None, or why there is no chart."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]')"
    t = res.get("targets", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.1]})
    # left: ratios against baselines (higher is better)
    sr = res.get("single_router", {})
    tp_r = sr.get("throughput", {}).get("ratios", {})
    cr_r = sr.get("conn_rate", {}).get("ratios", {})
    bars = [("throughput\nSYN-only", res.get("throughput_ratio"), 0.95, tp_r.get("syn_only")),
            ("throughput\nall-packets", res.get("all_packets_ratio"), None, tp_r.get("all_packets")),
            ("conn/s\nsynlb", res.get("conn_rate_ratio"), 0.9, cr_r.get("synlb")),
            ("conn/s\n2 queues", res.get("conn_rate_ratio_multiqueue"), None, cr_r.get("synlb_mq"))]
    xs = list(range(len(bars)))
    vals = [b[1] or 0 for b in bars]
    colors = [("#4c9a2a" if (b[1] or 0) >= b[2] else "#c0392b") if b[2] else "#7f8c8d" for b in bars]
    lo = [v - min(b[3]) if b[3] else 0 for v, b in zip(vals, bars)]
    hi = [max(b[3]) - v if b[3] else 0 for v, b in zip(vals, bars)]
    ax1.bar(xs, vals, color=colors, yerr=[lo, hi], capsize=6, ecolor="#333333")
    top1 = max([v + h for v, h in zip(vals, hi)] + [1.1])
    for x, b, v, h in zip(xs, bars, vals, hi):
        if b[2]:
            ax1.hlines(b[2], x - 0.4, x + 0.4, colors="black", linestyles="dashed")
        ax1.text(x + 0.08, v + h + 0.02 * top1, _fmt(b[1]), ha="left", fontsize=10)
    ax1.set_xticks(xs, [b[0] for b in bars])
    ax1.set_ylim(0, top1 * 1.12)
    ax1.axhline(1.0, color="grey", linewidth=0.5)
    ax1.set_title("median ratio to baseline, bars: per-round range\n(dashed: target; higher is better)",
                  fontsize=10)
    # right: value / target budget (lower is better)
    budget = [("CPU us\nper conn", "cpu_us_per_conn"), ("RSS MB", "worker_rss_mb"),
              ("Maglev\n100 tgts", "maglev_build_ms_100"), ("failover\ngap", "failover_gap_s")]
    labels, fr, txt, col = [], [], [], []
    for lab, key in budget:
        v = t.get(key, {})
        lim = float(v.get("target", "0 1").split()[-1]) if v.get("target") else None
        val = v.get("value")
        labels.append(lab)
        f = (val / lim) if (val is not None and lim) else 0
        fr.append(f)
        txt.append(f"{_fmt(val, 4 if key == 'failover_gap_s' else 3)} / {lim:g}" if lim else "n/a")
        col.append("#4c9a2a" if v.get("met") else "#c0392b")
    ax2.bar(range(len(labels)), fr, color=col)
    ax2.axhline(1.0, color="black", linestyle="dashed")
    veth = res.get("cpu_us_per_conn_veth")
    cpu_lim = TARGET_LIMITS.get("cpu_us_per_conn")
    if veth and cpu_lim and fr[0]:
        ax2.text(0, fr[0] / 2, f"NIC-like\nlinks\n(plain veth:\n{veth:.0f})", ha="center", va="center",
                 fontsize=8, color="white")
    top = max(fr + [1.0])
    for x, (f, s) in enumerate(zip(fr, txt)):
        ax2.text(x, f * 1.08 if top > 8 else f + 0.03 * top, s, ha="center", fontsize=9)
    ax2.set_xticks(range(len(labels)), labels)
    ax2.set_yscale("log" if top > 8 else "linear")
    ax2.set_ylim(0.01 if top > 8 else 0, top * (2.5 if top > 8 else 1.2))
    ax2.set_title("value / target (dashed: the target; lower is better)", fontsize=10)
    fo = res.get("failover", {})
    kept = f"{fo.get('kept')}/{fo.get('sessions')}" if fo else "n/a"
    m = res.get("machine", {})
    fig.suptitle(f"synlb bench {res.get('date', '')[:10]} on {m.get('hostname')} ({m.get('cpus')} CPUs)"
                 f" - failover sessions kept {kept}{' - QUICK' if res.get('quick') else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
