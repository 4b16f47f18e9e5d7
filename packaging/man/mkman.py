#!/usr/bin/python3
"""Write the man pages synlb(8) and synlb.ini(5) into DIR.

    PYTHONPATH=plugin python3 packaging/man/mkman.py [--version V] DIR

The reference parts come from the code itself, so they cannot drift from
what synlb accepts: the commands and their options from the argparse
parser (synlb.cli.build_parser), the INI sections, keys, defaults and
one-line descriptions from the option schemas (synlb.config.SECTION_KINDS
and each plugin's SECTIONS / SERVICE_OPTIONS / TARGET_OPTIONS). The prose
around them is in this file. Plain roff (the man macros) is written
directly: no tool beyond python3 at build time, and groff/man-db render it.

Only the standard library and synlb's pure modules are imported (no
kernel, no root). The date is $SOURCE_DATE_EPOCH's (dpkg-buildpackage sets
it from debian/changelog), so the pages are reproducible.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pkgutil
import sys

from synlb import cli, config, errors, schema
import synlb.plugins

# ---------------------------------------------------------------- roff


def esc(text: str) -> str:
    """Text for a roff line: backslashes and hyphen-minus escaped, no line
    starting with a control character."""
    out = str(text).replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + ln if ln[:1] in (".", "'") else ln for ln in out.split("\n"))


def para(*texts: str) -> list[str]:
    return [line for t in texts for line in (".PP", esc(" ".join(t.split())))]


def tp(tag: str, *texts: str) -> list[str]:
    """A tagged paragraph; ``tag`` is roff already."""
    return [".TP", tag] + [esc(" ".join(t.split())) for t in texts if t]


def bold(s: str) -> str:
    return f"\\fB{esc(s)}\\fR"


def ital(s: str) -> str:
    return f"\\fI{esc(s)}\\fR"


def example(text: str) -> list[str]:
    return [".PP", ".RS 4", ".nf"] + [esc(ln) for ln in text.strip("\n").split("\n")] + [".fi", ".RE"]


def header(name: str, section: int, version: str, manual: str) -> list[str]:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    day = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d")
    return ["'\\\" -*- coding: UTF-8 -*-",  # man-db assumes Latin-1 otherwise
            f'.TH "{name.upper()}" "{section}" "{day}" "synlb {version}" "{manual}"']


# ---------------------------------------------------------------- synlb(8)

DESCRIPTION = [
    """synlb balances connections to a service's virtual IPs (VIPs) over real
    servers (targets) on a pair of routers that share addresses with VRRP
    (keepalived). It installs a few netfilter chains, one policy route per
    target and NFQUEUE workers: only the packet that opens a connection goes
    to user space, where a worker picks the target with Maglev consistent
    hashing and sets the fwmark; conntrack saves the mark and every later
    packet stays in the kernel. With conntrack loose pickup turned on, a new
    master adopts the running TCP sessions after a failover and, since every
    router computes the same hash, sends them to the same targets.""",
    """synlb only ever touches what it owns: chains named synlb-*, rules in
    built-in chains commented synlb:SERVICE, and ip rules and routes with
    its routing protocol (route_protocol, 229 by default). synlb down leaves
    the rule sets, ip rules, routing tables and pickup sysctls exactly as
    they were before synlb up.""",
    """keepalived tells synlb about VRRP transitions through the notify hook
    /usr/lib/synlb/keepalived-notify, its notify_fifo (synlb fifo) or its
    D-Bus signals (synlb dbus, or the host's dbus plugin); the example
    keepalived.conf in /usr/share/doc/synlb/examples/ uses the hook. Events
    are ordered and serialized: the data plane ends in the state of the
    last event.""",
]

# options the parser has no help text for
EXTRA_HELP = {"--verbose": "log debug messages too", "--json": "print JSON instead of text"}

EXIT_STATUS = [
    ("0", "success; for check: the configuration is valid and describes at least one service"),
    (str(errors.EXIT_USER), "a problem the user can fix: a configuration error (each printed as "
                            "FILE:SECTION:KEY: why), a missing interface, iptables refusing a rule, "
                            "not running as root..."),
    ("2", "wrong usage (an unknown command or option)"),
    (str(errors.EXIT_UNCONFIGURED), "check only: nothing is configured, i.e. the configuration has no "
                                    "[service:NAME] section and no other problem (the shipped "
                                    "/etc/synlb/synlb.ini); synlb balances nothing and synlb.service "
                                    "skips its start"),
    (str(errors.EXIT_INTERRUPTED), "interrupted (SIGINT)"),
]

FILES = [
    (config.DEFAULT_CONFIG, "the configuration, synlb.ini(5); as shipped every setting is commented "
                            "out"),
    ("/etc/synlb/synlb.d/*.ini", "drop-ins, read after synlb.ini in name order; a later file "
                                 "overrides single keys"),
    ("/etc/synlb/scripts.d/STATE/", "the scripts plugin's executables, per VRRP state"),
    ("/run/synlb/", "the default state_dir: pid files, saved sysctls, the record of what is applied, "
                    "the VRRP journal, the host's control socket"),
    ("/run/synlb/workers/", "what the NFQUEUE workers read (their tables, the pins; root writes them) "
                            "and, in run/, the one place they write (their counters, old logs): the "
                            "workers run as worker_user (_synlb, created by the package) with "
                            "CAP_NET_ADMIN only"),
    ("/usr/lib/synlb/keepalived-notify", "keepalived's notify script: runs synlb notify; root-owned, "
                                         "as keepalived's enable_script_security requires"),
    ("/lib/systemd/system/synlb.service", "runs synlb run (Type=notify, reload with SIGHUP)"),
    ("/usr/share/doc/synlb/examples/keepalived.conf.example", "keepalived.conf for a pair of synlb "
                                                              "routers"),
]

ENVIRONMENT = [
    (config.ENV_CONFIG, "the configuration file when --config is not given"),
    ("SYNLB_BIN", "keepalived-notify: the synlb executable it runs (default /usr/bin/synlb)"),
    ("DBUS_SYSTEM_BUS_ADDRESS", "synlb dbus and the dbus plugin: the bus keepalived is on"),
    ("NOTIFY_SOCKET", "synlb run: set by systemd; READY=1 is sent once the data plane is reconciled, "
                      "STOPPING=1 when the host stops"),
]

RUN = [
    """synlb run is the plugin host, normally started by synlb.service. It
    reconciles every plugin named in [synlb] plugins (lb, the data plane, by
    default) to the node's VRRP state in one thread, supervises the workers,
    restores per-target routes when a link comes back and re-reads the
    configuration on SIGHUP (systemctl reload synlb): a configuration that
    does not pass check is refused and the running one kept. SIGTERM or
    SIGINT stop it after removing what it installed.""",
]


def _sub_actions(parser: argparse.ArgumentParser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    # commands with help= only: the internal ones (worker) have none
    return [(ca.dest, ca.help, sub.choices[ca.dest]) for ca in sub._choices_actions]


def _option_tag(a: argparse.Action) -> str:
    takes = a.nargs != 0
    meta = a.metavar or (a.dest.upper() if a.option_strings else a.dest)
    if not a.option_strings:
        return ital(meta) + (" ..." if a.nargs in ("*", "+") else "")
    names = sorted(a.option_strings, key=len)
    return ", ".join(bold(n) + (" " + ital(meta) if takes else "") for n in names)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
            continue
        helptext = a.help or EXTRA_HELP.get(max(a.option_strings, key=len, default=""), "")
        out += tp(_option_tag(a), helptext)
    return out


def _usage(parser: argparse.ArgumentParser) -> str:
    u = parser.format_usage().strip()
    u = u[len("usage: "):] if u.startswith("usage: ") else u
    return " ".join(u.replace("[-h] ", "").replace(" [-h]", "").split())


def synlb_8(version: str) -> str:
    p = cli.build_parser()
    out = header("synlb", 8, version, "System Administration")
    out += [".SH NAME", esc("synlb - SYN-only NFQUEUE load balancer with Maglev hashing for keepalived "
                            "(VRRP) routers")]
    out += [".SH SYNOPSIS", f"{bold('synlb')} [{bold('--config')} {ital('FILE')}] [{bold('-v')}] "
            f"{ital('COMMAND')} [{ital('ARGS')}]", ".br", f"{bold('synlb')} {bold('--version')}"]
    out += [".SH DESCRIPTION"] + para(*DESCRIPTION)
    out += [".SH OPTIONS"] + _options(p)
    out += [".SH COMMANDS"]
    for name, helptext, sp in _sub_actions(p):
        out += [".SS " + esc(_usage(sp))]
        out += para(helptext + ".")
        if sp.description:
            out += para(sp.description)
        opts = _options(sp)
        if opts:
            out += [".RS 4"] + opts + [".RE"]
    out += [".SH THE PLUGIN HOST"] + para(*RUN)
    out += [".SH EXIT STATUS"]
    for code, why in EXIT_STATUS:
        out += tp(bold(code), why)
    out += [".SH ENVIRONMENT"]
    for name, why in ENVIRONMENT:
        out += tp(bold(name), why)
    out += [".SH FILES"]
    for name, why in FILES:
        out += tp(ital(name), why)
    out += [".SH SEE ALSO", "\\fBsynlb.ini\\fR(5), \\fBkeepalived\\fR(8), \\fBkeepalived.conf\\fR(5), "
            "\\fBiptables\\fR(8), \\fBip\\-rule\\fR(8), \\fBconntrack\\fR(8)"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- synlb.ini(5)

INI_DESCRIPTION = [
    f"""synlb reads its configuration from the file given with --config, else
    ${config.ENV_CONFIG}, else {config.DEFAULT_CONFIG}; then every synlb.d/*.ini
    beside it, in name order. A later file overrides single keys of an
    earlier one. Keys are case sensitive; lists are separated by commas or
    spaces; a line starting with # or ; is a comment.""",
    """synlb check validates every file at once and names each problem as
    FILE:SECTION:KEY: why. No bad value is ever replaced by a default: a
    configuration with a problem is refused as a whole (by synlb run's
    reload too, which keeps the running one).""",
    f"""The file the package installs configures nothing: every setting in it
    is a commented example, with the documentation of each key. Until a
    [service:NAME] section exists, synlb check says nothing is configured
    (exit {errors.EXIT_UNCONFIGURED}) and synlb.service does not start.""",
]

SECTION_INTRO = {
    "synlb": "Settings of the router. state_dir, hash_key and route_protocol must be the same for "
             "every command that acts on one router; hash_key must be the same on every router of a "
             "cluster: that is what makes a new master send a picked-up connection to the same target.",
    "service": "One section per balanced service, NAME being 1-12 of A-Z a-z 0-9 _ (it names the "
               "chains synlb-VIP-NAME and synlb-DNAT-NAME). In route mode the VIPs must not be local "
               "addresses of the router: the targets own them on their loopback and use the back VRRP "
               "address as their gateway. In nat mode the router DNATs to the target's address.",
    "target": "One section per real server, NAME being 1-64 of A-Z a-z 0-9 _ . -.",
    "vrrp": "What drives this router: the keepalived sync group (or instance) whose state every VRRP "
            "event source records. MASTER is active; BACKUP is active with standby = hot (a hot "
            "standby: a takeover needs nothing from synlb) and inactive with cold; FAULT, STOP and "
            "DELETED remove everything synlb installed. Without [vrrp] the router is standalone and "
            "always active.",
}

INI_EXAMPLE = """\
[synlb]
# a secret, the same on every router: openssl rand -hex 32
hash_key = 3f6c0b2e8a91d4c7e5b0a8f2c6d1e9b4
plugins = lb, health

[service:web]
vips = 192.0.2.10/32, 2001:db8::10/128
ingress = eth0
egress = eth1
protocols = tcp
ports = 80, 443
targets = t1, t2

[target:t1]
address = 198.51.100.11, 2001:db8:1::11
check = tcp
check_port = 80

[target:t2]
address = 198.51.100.12, 2001:db8:1::12
check = tcp
check_port = 80

[vrrp]
sync_group = G1
"""


def _default(opt: schema.Option) -> str:
    d = opt.default
    if d is schema.REQUIRED:
        return "required"
    if d is None:
        return "unset"
    if isinstance(d, bool):
        return "yes" if d else "no"
    if isinstance(d, (list, tuple)):
        if not d:
            return "empty"
        if len(d) == 2 and d[0] == d[1] and isinstance(d[0], int):  # a range of one (queue = 0)
            return str(d[0])
        return ", ".join(str(x) for x in d)
    if isinstance(d, float) and d.is_integer():
        return str(int(d))
    return str(d)


def _keys(sch, origin: dict[str, str] | None = None) -> list[str]:
    out = []
    for opt in sch:
        by = (origin or {}).get(opt.name)
        if opt.default is schema.REQUIRED:
            note = "Required."
        elif opt.default is None and "default" in opt.help.lower():
            note = ""  # the help says what an unset key means
        else:
            note = f"Default: {_default(opt)}."
        note += f" With the {by} plugin." if by else ""
        out += tp(f"{bold(opt.name)} = {ital('value')}", f"{opt.help}. {note}".strip() if opt.help else note)
    return out


def plugin_modules() -> list[tuple[str, object]]:
    """The plugins shipped in synlb.plugins, by name."""
    mods = []
    for m in sorted(pkgutil.iter_modules(synlb.plugins.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"synlb.plugins.{m.name}")
        if callable(getattr(mod, "create", None)):
            mods.append((m.name, mod))
    return mods


def _first_paragraph(name: str, doc: str | None) -> str:
    text = " ".join((doc or "").strip().split("\n\n")[0].replace("``", "").split())
    return text[len(name) + 2:] if text.startswith(f"{name}: ") else text


def synlb_ini_5(version: str) -> str:
    out = header("synlb.ini", 5, version, "File Formats")
    out += [".SH NAME", esc("synlb.ini - configuration of synlb")]
    out += [".SH SYNOPSIS", ital(config.DEFAULT_CONFIG), ".br", ital("/etc/synlb/synlb.d/*.ini")]
    out += [".SH DESCRIPTION"] + para(*INI_DESCRIPTION)
    plugins = plugin_modules()
    out += [".SH SECTIONS"]
    for kind, (sch, named) in config.SECTION_KINDS.items():
        origin: dict[str, str] = {}
        if kind in ("service", "target"):
            attr = f"{kind.upper()}_OPTIONS"
            extra = []
            for name, mod in plugins:
                more = list(getattr(mod, attr, ()))
                origin.update({o.name: name for o in more})
                extra.append(more)
            sch = sch.extended(*extra)
        out += [".SS " + esc(f"[{kind}:NAME]" if named else f"[{kind}]")]
        if kind in SECTION_INTRO:
            out += para(SECTION_INTRO[kind])
        out += _keys(sch, origin)
    for name, mod in plugins:
        for sec, sch in sorted(getattr(mod, "SECTIONS", {}).items()):
            out += [".SS " + esc(f"[{sec}]")] + para(f"Read while the {name} plugin is listed in [synlb] "
                                                     "plugins.") + _keys(sch)
    out += [".SH PLUGINS"]
    out += para("""[synlb] plugins names the plugins synlb run hosts, in the order every
                reconcile runs them; the keys and sections of a plugin are accepted only
                while it is listed. A dotted name (mypkg.myplugin) imports a plugin shipped
                elsewhere: it must be a root-owned file that only root can write, in such
                directories. The plugins shipped with synlb:""")
    for name, mod in plugins:
        own = [f"[{sec}]" for sec in sorted(getattr(mod, "SECTIONS", {}))]
        own += [f"keys of [{kind}:NAME]" for kind in ("service", "target") if getattr(mod, f"{kind.upper()}_OPTIONS", ())]
        out += tp(bold(name), _first_paragraph(name, mod.__doc__), f"Its settings: {', '.join(own)}." if own else "")
    out += [".SH EXAMPLE"] + para("One service over two health-checked targets, driven by keepalived's "
                                  "sync group G1:") + example(INI_EXAMPLE)
    out += [".SH FILES"]
    out += tp(ital(config.DEFAULT_CONFIG), "as installed, every setting commented out, each key with "
                                           "its documentation")
    out += tp(ital("/usr/share/doc/synlb/examples/keepalived.conf.example"),
              "keepalived.conf for a pair of synlb routers")
    out += [".SH SEE ALSO", "\\fBsynlb\\fR(8), \\fBkeepalived.conf\\fR(5)"]
    return "\n".join(out) + "\n"


PAGES = {"synlb.8": synlb_8, "synlb.ini.5": synlb_ini_5}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", default=None, help="the version to print (default: synlb's)")
    ap.add_argument("dir")
    args = ap.parse_args(argv)
    version = args.version or synlb.__version__
    os.makedirs(args.dir, exist_ok=True)
    for name, page in PAGES.items():
        with open(os.path.join(args.dir, name), "w", encoding="utf-8") as fh:
            fh.write(page(version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
