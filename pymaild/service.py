# -*- test-case-name: tests.integration.test_startup -*-
"""
The composition root: the only module that puts concrete classes from several packages
together.  C{build(config)} checks every file the configuration names, prepares the data
directory, binds every socket and returns the service twistd runs.

Order matters, so that a mistake stops start-up before anything listens: L{checkFiles} (what
C{pymaildctl check-config} runs too), then the data directory, the self-signed certificate and
the first account, and last L{pymaild.listen.bindAll}, which binds every socket or none.

Security: C{build} runs as the user twistd was started as (root for ports below 1024); files it
creates are handed to C{--uid/--gid} so that the process can still read them after twistd
drops privileges.
"""

from __future__ import annotations

import io
import os
import pickle
import secrets
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.application.service import MultiService
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.interfaces import IAccountIMAP, IMailboxPOP3, IMessageDelivery
from twisted.python.threadpool import ThreadPool

import pymaild.plugins
from pymaild import tls as tlsmod
from pymaild.auth import passwords
from pymaild.auth.aliases import AliasesError, AliasesFile
from pymaild.auth.checkers import PasswdFileChecker
from pymaild.auth.directory import FileDirectory
from pymaild.auth.passwdfile import PasswdFile
from pymaild.auth.realm import MailRealm
from pymaild.config import LISTENERS, Config
from pymaild.errors import ConfigError, fileProblem
from pymaild.listen import ConnectionRegistry, ListenerFactory, ListenerService, bindAll
from pymaild.pipeline import plugin as pluginmod
from pymaild.pipeline.runner import Pipeline
from pymaild.queue.quarantine import Quarantine
from pymaild.store.delivery import Placement, deliverToUsers, hasRoom
from pymaild.queue import dsn as dsnmod
from pymaild.queue.files import Envelope, QueueFiles, Recipient
from pymaild.queue.mx import MXResolver, ResolverOnFirstUse, makeResolver
from pymaild.queue.runner import Policy, Runner
from pymaild.smtp.server import SMTPFactory, SubmissionLogin
from pymaild.store.maildir import MaildirStore
from pymaild.store.summarizer import Summarizer
from pymaild.store.threads import StoreThreads
from pymaild.throttle import LoginThrottle

if TYPE_CHECKING:  # (imported when [auth] backend = "ldap": build() and ldapSettings())
    from pymaild.auth.ldap import LdapSettings

log = Logger()


def _where(config: Config) -> str:
    return str(config.source) if config.source else "embedded default"


def _checkReadable(path: Path, name: str, where: str, mustExist: bool, table: str = "auth") -> bool:
    """
    @return: whether the file exists (and is readable).
    @raise ConfigError: missing although named in the file, unreadable, or not a file.
    """
    try:
        with open(path, "rb"):
            return True
    except FileNotFoundError:
        if mustExist:
            raise ConfigError(f"{where}: [{table}] {name}: {path}: no such file") from None
        return False
    except OSError as e:
        raise ConfigError(f"{where}: [{table}] {name}: {path}: {fileProblem(e)}") from None


def checkFiles(config: Config) -> tlsmod.ServerTLS | None:
    """
    Check every file the configuration names, without changing anything: the data directory,
    the TLS certificate and key, the passwd-file and the aliases file.  C{pymaildctl
    check-config} and start-up both run this.

    @return: the certificate and key as checked (start-up serves them: loading an RSA key is
        most of its check, about 35 ms), or None when the self-signed pair is still to be made.
    @raise ConfigError: one line naming the file, the key and the problem.
    """
    where = _where(config)
    data = config.server.data_dir
    if data.exists() and not data.is_dir():
        raise ConfigError(f"{where}: [server] data_dir: {data}: not a directory")
    if data.is_dir() and not os.access(data, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: [server] data_dir: {data}: not writable")
    tls = None
    if not config.tls.self_signed:
        tls = tlsmod.ServerTLS(config.tls.cert, config.tls.key, config.tls.min_version, where)
    else:
        cert, key = tlsmod.selfSignedPaths(data)
        if cert.exists() or key.exists():
            tls = tlsmod.ServerTLS(cert, key, config.tls.min_version, where)
    for key in ("relay_password_file", "ca_file"):
        path = getattr(config.queue, key)
        if path is not None:
            _checkReadable(path, key, where, True, "queue")
            if key == "ca_file":
                try:
                    tlsmod.clientTLS("check", True, path)
                except Exception as e:
                    raise ConfigError(f"{where}: [queue] ca_file: {path}: not a PEM certificate ({e})") from None
    for key in ("bind_password_file", "ca_file"):
        path = getattr(config.ldap, key)
        if path is not None and config.auth.backend == "ldap":
            _checkReadable(path, key, where, True, "ldap")
    if config.auth.backend == "ldap":
        return tls  # (no passwd-file or aliases file: the directory holds the accounts)
    _checkReadable(config.auth.passwd_file, "passwd_file", where, config.auth.passwd_file_explicit)
    if _checkReadable(config.auth.aliases_file, "aliases_file", where, config.auth.aliases_file_explicit):
        try:
            AliasesFile(config.auth.aliases_file).check()
        except AliasesError as e:
            raise ConfigError(f"{where}: [auth] aliases_file: {e}") from None
    return tls


class _Owner:
    """
    Hands files created before privileges are dropped to the C{--uid/--gid} twistd runs as.
    """

    def __init__(self, uid: int | None, gid: int | None):
        self.uid, self.gid = uid, gid

    def __call__(self, path: Path) -> None:
        if self.uid is None and self.gid is None:
            return
        os.chown(path, -1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)


def _prepareDataDir(config: Config, own: _Owner) -> None:
    data = config.server.data_dir
    try:
        if not data.exists():
            data.mkdir(mode=0o750, parents=True)
            own(data)
        for sub in ("mail", "tls"):
            if not (data / sub).exists():
                (data / sub).mkdir(mode=0o750 if sub == "mail" else 0o700)
                own(data / sub)
    except OSError as e:
        raise ConfigError(f"{_where(config)}: [server] data_dir: {data}: {e.strerror}") from None


def _serverTLS(config: Config, own: _Owner, checked: tlsmod.ServerTLS | None = None) -> tlsmod.ServerTLS:
    """The certificate the listeners serve: C{checked} (L{checkFiles}'s), or the self-signed
    pair, made now if it is not there yet."""
    if checked is not None:
        return checked
    where = _where(config)
    if config.tls.self_signed:
        cert, key = tlsmod.selfSignedPaths(config.server.data_dir)
        if not cert.exists() or not key.exists():
            tlsmod.generateSelfSigned(cert, key, config.server.hostname)
            own(cert)
            own(key)
            log.info(
                "generated a self-signed certificate for {hostname} in {cert}",
                hostname=config.server.hostname,
                cert=str(cert),
            )
    else:
        cert, key = config.tls.cert, config.tls.key
    return tlsmod.ServerTLS(cert, key, config.tls.min_version, where)


def _firstAccount(config: Config, passwd: PasswdFile, own: _Owner) -> None:
    """
    With no account at all, create C{postmaster@<first local domain>} with a random password,
    log it once and leave it (mode 0600) in C{<data_dir>/postmaster.password}.
    """
    if len(passwd):
        return
    user = f"postmaster@{config.domains.local[0]}"
    password = secrets.token_urlsafe(15)
    while password[0] == "-":  # (a leading dash reads as an option to swaks, mutt's -e ...)
        password = secrets.token_urlsafe(15)
    passwordFile = config.server.data_dir / "postmaster.password"
    try:
        passwd.add(user, passwords.hash_password(password))
        own(config.auth.passwd_file)
        fd = os.open(passwordFile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        own(passwordFile)
    except OSError as e:
        raise ConfigError(
            f"{_where(config)}: [auth] passwd_file: {config.auth.passwd_file}: cannot create the first account: {e.strerror}"
        ) from None
    log.warn(
        "created the first account {user} with password {password} (also in {file}); "
        "change it with: pymaildctl user passwd {user}",
        event="first-account",
        user=user,
        password=password,
        file=str(passwordFile),
    )


class PymaildService(MultiService):
    """
    Everything pymaild runs.  Stops in the order a clean shutdown needs: stop accepting, let
    in-flight transactions finish (at most C{[server] shutdown_timeout}), then stop the thread
    pools.  SIGHUP re-reads the certificate, the passwd-file and the aliases.
    """

    def __init__(self, config: Config, listeners, registry, threadpools, reloadables, reactor=None):
        super().__init__()
        self.config = config
        self.listeners = list(listeners)
        self.registry = registry
        self.threadpools = list(threadpools)
        self.reloadables = list(reloadables)
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._previousHUP = None
        self.plugins = None  # (the Plugins, closed at the end of stopService)
        self.summarizer = None  # (the store's Summarizer: its worker processes stop last)
        self.checker = None  # (the LDAP checker: its login connections are unbound at the end)
        self.workerPools = []  # (pymaild.handoff.WorkerPool: their sessions close with ours)
        self.earlySignals = None  # (build's _EarlySignals: the SIGHUP handler before startService's)

    def privilegedStartService(self):
        for listener in self.listeners:
            listener.privilegedStartService()
        super().privilegedStartService()

    def startService(self):
        from pymaild.log import quickenTextLog

        if quickenTextLog():  # (twistd's text log began before this: the same lines, faster)
            log.debug("log: twistd's text lines made by pymaild.log.ClassicText")
        # first: a SIGHUP sent once the ports answer must find a handler, not the default
        # action, which ends the process (the ports accept connections from build() on, where
        # _EarlySignals took such a signal down; a reload asked for before the reactor runs
        # runs once it does)
        self._previousHUP = signal.signal(signal.SIGHUP, self._onHUP)
        early, self.earlySignals = self.earlySignals, None
        if early is not None:
            self._previousHUP = early.previous[signal.SIGHUP]
            if early.asked:
                self._reactor.callFromThread(self.reload)
        for pool in self.threadpools:
            pool.start()
        for listener in self.listeners:
            listener.startService()
        super().startService()
        log.info(
            "pymaild started: hostname {hostname}, domains {domains}, data in {data_dir}",
            hostname=self.config.server.hostname,
            domains=", ".join(self.config.domains.local),
            data_dir=str(self.config.server.data_dir),
        )

    def _onHUP(self, signum, frame):
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        log.info("SIGHUP: re-reading the certificate, the passwd-file, the aliases and the plugins' settings")
        for reloadable in self.reloadables:
            try:
                reloadable.reload()
            except Exception:
                log.failure("reloading {what} failed", what=reloadable)

    @defer.inlineCallbacks
    def stopService(self):
        if self._previousHUP is not None:
            signal.signal(signal.SIGHUP, self._previousHUP)
            self._previousHUP = None
        log.info(
            "pymaild stopping: no new connections; {count} open, waiting up to {timeout}s",
            count=len(self.registry.connections),
            timeout=self.config.server.shutdown_timeout,
        )
        yield defer.gatherResults(
            [defer.maybeDeferred(listener.stopService) for listener in self.listeners]
        )
        timeout = self.config.server.shutdown_timeout
        yield defer.gatherResults([self.registry.drain(timeout)] + [pool.stop(timeout) for pool in self.workerPools])
        yield defer.maybeDeferred(super().stopService)
        if self.plugins is not None:
            yield self.plugins.close()
        for pool in self.threadpools:
            pool.stop()
        if self.summarizer is not None:
            self.summarizer.close()
        if self.checker is not None and hasattr(self.checker, "close"):
            self.checker.close()
        log.info("pymaild stopped")


class _EarlySignals:
    """
    Signals between the binding of the sockets (in L{build}: they accept connections from then
    on, and a client, a supervisor or a test may signal the process once they do) and the
    handlers of the running service and reactor; without these, their default action ends the
    process at once, and with it the log lines made so far, which twistd has not written yet
    (the first account's password, a generated certificate).
      - SIGHUP is noted, and the reload runs once the reactor does
        (L{PymaildService.startService} installs the handler that reloads).
      - SIGTERM and SIGINT get the reactor's own handlers (C{sigTerm}, C{sigInt}) now instead of
        at C{reactor.run}: the stop waits for the reactor to run, then shuts down as ever
        (the service stopped, the log written, the exit by the signal).
    """

    def __init__(self, reactor):
        self.asked = False
        self.previous = {signal.SIGHUP: signal.signal(signal.SIGHUP, self._heard)}
        for signum, name in ((signal.SIGTERM, "sigTerm"), (signal.SIGINT, "sigInt")):
            handler = getattr(reactor, name, None)  # (every reactor twistd runs has them)
            if handler is not None:
                self.previous[signum] = signal.signal(signum, handler)

    def _heard(self, signum, frame) -> None:
        self.asked = True

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Plugins:
    """
    The enabled plugins: made at start-up from C{[plugins]}, made again from the re-read file on
    SIGHUP (new settings, plugins enabled or disabled; plugin code is not re-imported: that
    needs a restart), closed at shutdown.
    """

    def __init__(self, config: Config, reactor, threadpool, resolver, own):
        from twisted.internet.threads import deferToThreadPool

        self.config, self.reactor, self.resolver, self.own = config, reactor, resolver, own
        self._run = lambda f, *args, **kw: deferToThreadPool(reactor, threadpool, f, *args, **kw)
        self.pipeline = Pipeline(pluginmod.load(config, pymaild.plugins, self.contextFor), reactor)
        if self.pipeline.entries:
            log.info("plugins: {names}", names=", ".join(e.name for e in self.pipeline.entries))

    def contextFor(self, name: str) -> pluginmod.PluginContext:
        state = self.config.server.data_dir / "plugins" / name
        state.mkdir(parents=True, exist_ok=True)
        try:
            self.own(state.parent)
            self.own(state)
        except OSError:  # (SIGHUP after privileges were dropped: made by the right user anyway)
            pass
        return pluginmod.PluginContext(name, self.reactor, self._run, state, self.resolver, self.config.server.hostname,
                                       self.config.domains.local)

    def reload(self) -> None:
        from pymaild.config import load

        if self.config.source is None:
            return
        try:
            config = load(self.config.source, self.config.server.data_dir)
            self.config = config
            entries = pluginmod.load(config, pymaild.plugins, self.contextFor)
        except ConfigError as e:
            log.error("SIGHUP: the plugins keep their settings: {error}", error=str(e))
            return
        old = self.pipeline.replace(entries)
        log.info("SIGHUP: plugins {names}", names=", ".join(e.name for e in entries) or "none")
        self._close(old)

    def _close(self, entries):
        ds = []
        for entry in entries:
            close = getattr(entry.hooks, "close", None)
            if close is not None:
                d = defer.maybeDeferred(close)
                d.addErrback(lambda f, name=entry.name: log.failure("plugin {plugin}: close", f, plugin=name))
                ds.append(d)
        return defer.gatherResults(ds)

    def close(self):
        return self._close(self.pipeline.replace([]))

    def __repr__(self) -> str:
        return "the plugins"


def _clearSpool(spool: Path) -> None:
    """
    Remove what SMTP sessions left in the spool when the server last stopped (a message that
    was still arriving, never acknowledged with 250: its sender sends it again).
    """
    try:
        names = os.listdir(spool)
    except FileNotFoundError:
        return
    for name in names:
        try:
            os.unlink(spool / name)
        except OSError as e:
            log.warn("cannot remove {path}: {error}", path=str(spool / name), error=e)


def _relayPassword(config: Config) -> str | None:
    if config.queue.relay_password_file is None:
        return None
    try:
        return config.queue.relay_password_file.read_text().splitlines()[0].strip()
    except (OSError, IndexError, UnicodeDecodeError) as e:
        raise ConfigError(f"{_where(config)}: [queue] relay_password_file: {config.queue.relay_password_file}: "
                          f"{e.strerror if isinstance(e, OSError) else 'no password in it'}") from None


def _needsUTF8(source, transaction: dict) -> bool:
    """
    Whether a message sent with SMTPUTF8 really needs it on the way out (RFC 6531 3.4): a
    non-ASCII address in the envelope, or non-ASCII bytes in its header.  An all-ASCII one is
    sent to servers without SMTPUTF8 too.
    """
    addresses = [transaction["sender"]] + [address for address, _, _ in transaction["recipients"]]
    if not all(a.isascii() for a in addresses):
        return True
    if isinstance(source, (bytes, bytearray)):
        head = bytes(source[: 1 << 16])
    else:
        with open(source, "rb") as f:
            head = f.read(1 << 16)
    end = head.find(b"\n\n")
    return not (head[: end if end >= 0 else len(head)]).isascii()


def _cores() -> int:
    """The CPU cores this process may run on (all of them where that cannot be known)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ldapSettings(config: Config) -> LdapSettings:
    from pymaild.auth.ldap import LdapSettings

    l = config.ldap
    password = l.bind_password
    if l.bind_password_file is not None:
        try:
            password = l.bind_password_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise ConfigError(f"{_where(config)}: [ldap] bind_password_file: {l.bind_password_file}: "
                              f"{e.strerror if isinstance(e, OSError) else 'no password in it'}") from None
    return LdapSettings(
        urls=l.urls, base_dn=l.base_dn, bind_dn=l.bind_dn, bind_password=password, start_tls=l.start_tls,
        ca_file=str(l.ca_file) if l.ca_file else None, user_filter=l.user_filter,
        address_attributes=l.address_attributes, active_filter=l.active_filter, group_filter=l.group_filter,
        member_attribute=l.member_attribute, group_address_attribute=l.group_address_attribute,
        quota_attribute=l.quota_attribute, mailbox_attribute=l.mailbox_attribute, timeout=l.timeout, pool_size=l.pool_size, cache_ttl=l.cache_ttl,
        negative_cache_ttl=l.negative_cache_ttl, bind_dn_template=l.bind_dn_template, balance=l.balance,
    )


def queuePolicy(config: Config) -> Policy:
    q = config.queue
    return Policy(
        relayHost=(q.relay_host.host, q.relay_host.port) if q.relay_host else None,
        remotePort=q.remote_port, tls=q.tls, authUser=q.relay_user or None, authPassword=_relayPassword(config),
        minBackoff=q.min_backoff, maxBackoff=q.max_backoff, maxLifetime=q.max_lifetime,
        delayWarning=q.delay_warning, connections=q.connections, perDestination=q.connections_per_destination,
        connectTimeout=q.connect_timeout, commandTimeout=q.command_timeout,
    )


class QueueSettings:
    """Re-reads the relay password on SIGHUP (the rest of [queue] needs a restart)."""

    def __init__(self, runner, config: Config):
        self.runner, self.config = runner, config

    def reload(self) -> None:
        self.runner.policy = queuePolicy(self.config)

    def __repr__(self) -> str:
        return "the relay password"


class Router:
    """
    Delivers messages pymaild makes itself (delivery status notifications) the way a message
    from SMTP would go: local addresses (aliases and lists expanded) into the users' INBOXes,
    other domains into the outbound queue.  The sender is the null sender (C{<>}).
    """

    def __init__(self, directory, store, run, queueFiles: QueueFiles, runner, hostname: str = "localhost"):
        self.directory, self.store, self.run = directory, store, run
        self.queueFiles, self.runner = queueFiles, runner
        self.hostname = hostname

    @defer.inlineCallbacks
    def bounce(self, path, recipient: str):
        domain = recipient.rpartition("@")[2]
        users, remote = (), [recipient]
        if self.directory.isLocalDomain(domain):
            resolution = yield self.directory.lookup(recipient)
            if not resolution.exists:
                log.warn("report for <{rcpt}> dropped: no such local address", rcpt=recipient)
                return
            users, remote = sorted(resolution.users), sorted(resolution.remote)

        def work():
            data = open(path, "rb").read()
            if users:
                deliverToUsers(self.store, b"Return-Path: <>\n" + data, users)
            if remote:
                envelope = Envelope(id="", sender="", recipients=[Recipient(r) for r in remote])
                return self.queueFiles.enqueue(data, envelope)

        id = yield self.run(work)
        if id is not None:
            self.runner.add(id)

    def reportDelivered(self, source, transaction: dict) -> None:
        """
        SMTP's C{reportDelivered} (in a store thread): a "delivered" DSN (RFC 3461 6.2) for the
        local recipients that asked NOTIFY=SUCCESS, written to the queue's tmp/ and routed from
        the reactor.
        """
        now = time.time()
        path = self.queueFiles.tmp / f"{transaction['client'].get('id') or 'report'}.{os.getpid()}.delivered"
        reports = [dsnmod.RecipientReport(address=address, action="delivered", status="2.0.0", original=orcpt,
                                          diagnostic="250 2.0.0 delivered to the mailbox", lastAttempt=now)
                   for address, orcpt in transaction["delivered"]]
        original = open(source, "rb") if not isinstance(source, (bytes, bytearray)) else io.BytesIO(bytes(source))
        with original, open(path, "wb") as out:
            original.seek(transaction.get("skip", 0))  # (without our Return-Path)
            dsnmod.writeDSN(out, reportingMta=self.hostname, sender=transaction["sender"], recipients=reports,
                            original=original, ret=transaction["ret"], envid=transaction["envid"],
                            arrival=now, now=now, messageId=f"{transaction['client'].get('id')}.{int(now)}.dsn@{self.hostname}")

        def route():
            d = self.bounce(path, transaction["sender"])
            d.addErrback(lambda f: log.failure("delivery report to <{sender}>", f, sender=transaction["sender"]))
            d.addBoth(lambda _: path.unlink(missing_ok=True))

        from twisted.internet import reactor

        reactor.callFromThread(route)

    def prepare(self, source, transaction: dict):
        """SMTP's C{enqueue}: into the queue's tmp/, fsynced (in a store thread)."""
        smtputf8 = transaction["smtputf8"] and _needsUTF8(source, transaction)
        envelope = Envelope(
            id=transaction["client"].get("id") or "", sender=transaction["sender"],
            recipients=[Recipient(address, orcpt=orcpt, notify=notify)
                        for address, notify, orcpt in transaction["recipients"]],
            body=transaction["body"], smtputf8=smtputf8, ret=transaction["ret"],
            envid=transaction["envid"], client=transaction["client"],
        )
        return self.queueFiles.prepare(source, envelope, skip=transaction.get("skip", 0))


def build(config: Config, reactor=None, uid: int | None = None, gid: int | None = None) -> PymaildService:
    """
    Check, prepare and bind; return the service to run.

    @raise ConfigError: anything wrong in the configuration or its files; nothing is left bound.
    """
    if reactor is None:
        from twisted.internet import reactor
    where = _where(config)
    own = _Owner(uid, gid)
    checked = checkFiles(config)
    _prepareDataDir(config, own)
    serverTLS = _serverTLS(config, own, checked)

    if config.auth.backend == "ldap":
        from pymaild.auth.ldap import LdapChecker, LdapClient, LdapDirectory  # (only for this backend)

        threadpool = ThreadPool(minthreads=0, maxthreads=config.ldap.pool_size, name="pymaild-ldap")
        client = LdapClient(ldapSettings(config))
        directory = LdapDirectory(client, threadpool, reactor, config.domains.local)
        checker = LdapChecker(client, threadpool, reactor)
    else:
        passwd = PasswdFile(config.auth.passwd_file)
        _firstAccount(config, passwd, own)
        aliases = AliasesFile(config.auth.aliases_file)
        directory = FileDirectory(passwd, aliases, config.domains.local)
        threadpool = ThreadPool(minthreads=0, maxthreads=config.auth.threads, name="pymaild-auth")
        checker = PasswdFileChecker(passwd, config.domains.local[0], threadpool, reactor)
    summarizer = Summarizer(config.store.summary_processes)
    store = MaildirStore(
        config.server.data_dir / "mail",
        config.store.quota_storage,
        config.store.quota_messages,
        config.store.specialFolders,
        summarizer,
    )
    storeThreads = StoreThreads(reactor, config.store.threads)
    if config.auth.backend == "ldap":  # (what users' entries say about their mailboxes, as they are read)
        directory.lookups.quotaSink = checker.lookups.quotaSink = store.setStorageLimit
        directory.lookups.keySink = checker.lookups.keySink = store.setMailboxKey
    _clearSpool(config.server.data_dir / "spool")
    queueFiles = QueueFiles(config.server.data_dir / "queue")
    try:  # (here, before any listener can queue a message: see QueueFiles.recover)
        queueFiles.recover()
        own(queueFiles.root)
        for sub in (queueFiles.tmp, queueFiles.messages, queueFiles.corrupt):
            own(sub)
    except OSError as e:
        raise ConfigError(f"{where}: [server] data_dir: {queueFiles.root}: {e.strerror}") from None
    nameservers = [(a.host, a.port) for a in config.queue.nameservers]
    dnsResolver = ResolverOnFirstUse(lambda: makeResolver(nameservers, reactor=reactor))  # (made at the first lookup)
    resolver = MXResolver(dnsResolver)
    pluginThreads = ThreadPool(minthreads=0, maxthreads=config.plugins.threads, name="pymaild-plugins")
    plugins = Plugins(config, reactor, pluginThreads, dnsResolver, own)
    pipeline = plugins.pipeline  # (empty until plugins are enabled: the protocols then skip it)
    quarantine = Quarantine(config.server.data_dir / "quarantine")
    caFile = config.queue.ca_file
    router = Router(directory, store, storeThreads.run, queueFiles, None, config.server.hostname)
    runner = Runner(queueFiles, resolver, storeThreads.run, reactor, queuePolicy(config), config.server.hostname,
                    router.bounce, tlsOptions=lambda host, verify: tlsmod.clientTLS(host, verify, caFile),
                    stopTimeout=config.server.shutdown_timeout)
    router.runner = runner
    runner.onEvent = lambda event: pipeline.notify("queue", event)
    def firstLogin(factory, parsers: bool = False):
        """
        Before handing out a mailbox avatar, make sure the user's special-use folders exist
        (in the store's threads: it touches the disk); with C{parsers} (IMAP), start the
        summary workers if they do not run yet, so that they are ready for the session's
        first FETCH of ENVELOPE (L{Summarizer.start}).
        """

        def prepare(user):
            store.user(user).ensureSpecialFolders()
            if parsers:
                summarizer.start()

        def avatar(user, mind):
            d = storeThreads.run(prepare, user)
            return d.addCallback(lambda _: factory(user, mind))

        return avatar

    # IMAP's and POP3's modules are imported only when a listener serves them (an MX alone
    # starts ~30 ms sooner and ~4 MB smaller); without one, no session asks for their avatars
    served = {protocol for name, protocol, _ in LISTENERS if getattr(config.listen, name)}
    avatars = {}
    if "imap" in served:
        from pymaild.imap.mailbox import StoreAccount
        from pymaild.imap.server import IMAPFactory
        from pymaild.store.watch import FolderWatcher

        watcher = FolderWatcher(reactor, storeThreads)  # deliveries by other processes reach IDLE
        avatars[IAccountIMAP] = firstLogin(
            lambda user, mind: (StoreAccount(store.user(user), storeThreads.run, watcher), lambda: None),
            parsers=True,
        )
    if "pop3" in served:
        from pymaild.pop3.mailbox import pop3Avatar
        from pymaild.pop3.server import Logins, POP3Factory

        avatars[IMailboxPOP3] = firstLogin(
            pop3Avatar(store, storeThreads.run, config.pop3.uidl_format, config.pop3.mark_seen)
        )
    realm = MailRealm(
        {
            **avatars,
            IMessageDelivery: lambda user, mind: (SubmissionLogin(user), lambda: None),
        }
    )
    portal = Portal(realm, [checker])

    hostname = config.server.hostname
    plaintext = config.auth.plaintext_networks
    throttle = LoginThrottle(config.limits.max_login_failures)
    imapSessions: dict = {}
    pop3Logins = Logins(portal, throttle, pipeline) if "pop3" in served else None

    def appFactory(name: str, protocol: str, implicitTLS: bool):
        if protocol == "smtp":
            smtpConfig = config.smtp
            return SMTPFactory(
                hostname, serverTLS, implicitTLS, portal, submission=name != "smtp", directory=directory,
                run=storeThreads.run, spool=config.server.data_dir / "spool", throttle=throttle, clock=reactor,
                trustedNetworks=smtpConfig.trusted_networks, localDomains=config.domains.local,
                maxSize=smtpConfig.max_message_size, maxRecipients=smtpConfig.max_recipients,
                maxLineLength=smtpConfig.max_line_length, bareLineEnds=smtpConfig.bare_line_ends,
                commandTimeout=smtpConfig.command_timeout, maxErrors=smtpConfig.max_errors,
                maxHops=smtpConfig.max_hops, dataTimeout=smtpConfig.data_timeout, vrfy=smtpConfig.vrfy,
                deliver=lambda path, users, placements=None: deliverToUsers(
                    store, path, users, {u: Placement(*p) for u, p in (placements or {}).items()}),
                pipeline=pipeline,
                quarantine=lambda source, transaction, users, reason: quarantine.hold(
                    source, transaction, users, reason,
                    {u: str(store.userDirectory(u).relative_to(store.root)) for u in users}),
                hasRoom=lambda user: hasRoom(store, user),
                enqueue=router.prepare, queued=runner.add, reportDelivered=router.reportDelivered,
            )
        if protocol == "imap":
            return IMAPFactory(
                portal, serverTLS, plaintext, implicitTLS, throttle,
                config.imap.append_limit, config.imap.autologout, config.imap.max_line, reactor,
                config.limits.max_connections_per_user, imapSessions, pipeline,
            )
        return POP3Factory(
            tls=serverTLS, plaintextNetworks=plaintext, implicitTLS=implicitTLS, clock=reactor,
            idleTimeout=config.pop3.idle_timeout, logins=pop3Logins,
        )

    registry = ConnectionRegistry(config.limits.max_connections, config.limits.max_connections_per_ip, reactor)
    pop3Workers = None
    processes = config.pop3.processes or min(64, _cores())  # (0: one per core it may use)
    if processes > 1 and "pop3" in served:
        from pymaild.handoff import HandOffListenerService, WorkerPool
        from pymaild.pop3.remote import LoginDesk

        def settings() -> bytes:  # (what a worker reads first, made when it starts: see pymaild.worker)
            return pickle.dumps({"config": config, "pem": serverTLS.pem, "where": serverTLS.where,
                                 "cert": serverTLS.certPath, "key": serverTLS.keyPath})

        pop3Workers = WorkerPool("pop3", processes - 1, settings, registry, reactor,
                                 desk=lambda worker: LoginDesk(pop3Logins, store), tls=serverTLS)
    early = _EarlySignals(reactor)  # (from here the ports accept connections: no signal may end the process unheard)
    try:
        sockets = bindAll(
            [(name, getattr(config.listen, name)) for name, _, _ in LISTENERS], config.listen.backlog, where
        )
    except BaseException:
        early.restore()
        raise
    listeners = []
    for name, protocol, implicitTLS in LISTENERS:
        for sock in sockets[name]:
            factory = ListenerFactory(
                name, appFactory(name, protocol, implicitTLS), registry, serverTLS if implicitTLS else None
            )
            if protocol == "pop3" and pop3Workers is not None:
                pop3Workers.listenerNames.add(name)
                listeners.append(HandOffListenerService(name, sock, factory, pop3Workers, reactor))
            else:
                listeners.append(ListenerService(name, sock, factory, reactor))
    service = PymaildService(config, listeners, registry, [threadpool, storeThreads.pool, pluginThreads],
                             [serverTLS, directory, QueueSettings(runner, config), plugins]
                             + ([pop3Workers] if pop3Workers is not None else []), reactor)
    service.workerPools = [pop3Workers] if pop3Workers is not None else []
    service.earlySignals = early
    service.plugins = plugins
    service.summarizer = summarizer
    service.checker = checker
    runner.setServiceParent(service)
    return service
