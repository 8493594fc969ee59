"""
The configuration file: every kind of mistake is one line naming the file, the table and the
key; start-up stops before anything is bound, with exit status 2 and no traceback.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from conftest import free_ports, run_twistd
from pymaild import config
from pymaild.errors import ConfigError

# (TOML text, text the one-line error must contain)
BAD_CONFIGS = [
    ("[sever]\nhostname = 'x'\n", "[sever]: unknown table (did you mean 'server'?)"),
    ("[server]\nhostnme = 'x'\n", "[server] hostnme: unknown key (did you mean 'hostname'?)"),
    ("[server]\nfoo = 1\n", "[server] foo: unknown key (known: hostname, data_dir, shutdown_timeout)"),
    ("server = 1\n", "server: expected a table [server], got an integer"),
    ("[server]\nhostname = 5\n", "[server] hostname: expected a string, got an integer"),
    ("[server]\nhostname = 'bad name!'\n", "[server] hostname: 'bad name!' is not a domain name"),
    ("[server]\ndata_dir = ''\n", "[server] data_dir: must not be empty"),
    ("[server]\nshutdown_timeout = 'soon'\n", "[server] shutdown_timeout: expected a number of seconds, got a string"),
    ("[server]\nshutdown_timeout = -1\n", "[server] shutdown_timeout: must be between 0 and 86400"),
    ("[listen]\nsmtp = '127.0.0.1:25'\n", "[listen] smtp: expected a list of \"host:port\" strings, got a string"),
    ("[listen]\nsmtp = [25]\n", "[listen] smtp: item 1 (25): expected a string, got an integer"),
    ("[listen]\nimap = ['localhost:143']\n", "[listen] imap: item 1 ('localhost:143'): 'localhost' is not an IP address"),
    ("[listen]\nimap = ['127.0.0.1:99999']\n", "[listen] imap: item 1 ('127.0.0.1:99999'): '99999' is not a port number"),
    ("[listen]\nimap = ['127.0.0.1']\n", "[listen] imap: item 1 ('127.0.0.1'): expected \"host:port\""),
    ("[listen]\nimap = ['[::1:143']\n", "[listen] imap: item 1 ('[::1:143'): '[::1' is not an IP address"),
    ("[listen]\nimap = ['[nope]:143']\n", "[listen] imap: item 1 ('[nope]:143'): 'nope' is not an IPv6 address"),
    ("[listen]\nimap = ['127.0.0.1:1143']\npop3 = ['127.0.0.1:1143']\n", "[listen] pop3: 127.0.0.1:1143 is also used by [listen] imap"),
    ("[listen]\nbacklog = 0\n", "[listen] backlog: must be between 1 and 65535, got 0"),
    ("[listen]\nbacklog = true\n", "[listen] backlog: expected an integer, got a boolean"),
    ("[tls]\ncert = 'c.pem'\n", "[tls] key: cert and key must be given together"),
    ("[tls]\nkey = 'k.pem'\n", "[tls] cert: cert and key must be given together"),
    ("[tls]\nmin_version = 'SSLv3'\n", "[tls] min_version: must be one of 'TLSv1.2', 'TLSv1.3', got 'SSLv3'"),
    ("[domains]\nlocal = []\n", "[domains] local: at least one local domain is needed"),
    ("[domains]\nlocal = 'example.com'\n", "[domains] local: expected a list of domain names, got a string"),
    ("[domains]\nlocal = ['exa mple.com']\n", "[domains] local: item 1 ('exa mple.com'): 'exa mple.com' is not a domain name"),
    ("[auth]\nbackend = 'pam'\n", "[auth] backend: must be one of 'passwd-file', 'ldap', got 'pam'"),
    ("[auth]\nbackend = 'ldap'\n", "[ldap] urls: at least one server is needed with [auth] backend = \"ldap\""),
    ("[auth]\nbackend = 'ldap'\n[ldap]\nurls = ['ldap://127.0.0.1']\n", "[ldap] base_dn: needed with [auth] backend"),
    ("[auth]\nbackend = 'ldap'\n[ldap]\nurls = ['ldap://127.0.0.1']\nbase_dn = 'dc=x'\nuser_filter = '(uid=x)'\n", "[ldap] user_filter: must contain {login}"),
    ("[ldap]\nurls = ['http://x']\n", "[ldap] urls: item 1 ('http://x'): 'http://x' is not an LDAP URL"),
    ("[ldap]\nuser_filter = 'uid={login}'\n", "[ldap] user_filter: 'uid={login}' is not an LDAP filter"),
    ("[ldap]\nactive_filter = '(!(a=b)'\n", "[ldap] active_filter: '(!(a=b)' is not an LDAP filter"),
    ("[ldap]\nmember_attribute = 'mem ber'\n", "[ldap] member_attribute: 'mem ber' is not an attribute name"),
    ("[ldap]\nbind_password = 'x'\nbind_password_file = 'f'\n", "[ldap] bind_password_file: give bind_password or bind_password_file, not both"),
    ("[ldap]\npool_size = 0\n", "[ldap] pool_size: must be between 1 and 64"),
    ("[auth]\nbackend = 'ldap'\n[ldap]\nurls = ['ldap://127.0.0.1']\nbase_dn = 'dc=x'\nbind_dn_template = 'uid=x'\n", "[ldap] bind_dn_template: must contain {login}"),
    ("[ldap]\nbalance = 'random'\n", "[ldap] balance: must be one of 'failover', 'round-robin'"),
    ("[auth]\nplaintext_networks = ['10.0.0.0/33']\n", "[auth] plaintext_networks: item 1 ('10.0.0.0/33'): not an IP network"),
    ("[auth]\nthreads = 0\n", "[auth] threads: must be between 1 and 64, got 0"),
    ("[smtp]\ntrusted_networks = 'any'\n", "[smtp] trusted_networks: expected a list of IP networks, got a string"),
    ("[limits]\nmax_connections = 10\nmax_connections_per_ip = 20\n", "[limits] max_connections_per_ip: must not be larger than max_connections"),
    ("[store]\nquota_storage = '1 gig'\n", "[store] quota_storage: expected a size such as 1048576, \"512M\" or \"2G\", got '1 gig'"),
    ("[store]\nquota_storage = -1\n", "[store] quota_storage: must not be negative"),
    ("[store]\nquota_messages = 'many'\n", "[store] quota_messages: expected an integer, got a string"),
    ("[store]\nsent = 'INBOX'\n", "[store] sent: 'INBOX' cannot be a special-use folder"),
    ("[store]\ntrash = 'a/b'\n", "[store] trash: 'a/b' cannot be a special-use folder"),
    ("[store]\njunk = 'Trash'\n", "[store] junk: 'Trash' is also the [store] trash folder"),
    ("[store]\nthreads = 100\n", "[store] threads: must be between 1 and 64, got 100"),
    ("[imap]\nautologout = 60\n", "[imap] autologout: RFC 3501 5.4 wants at least 1800 seconds"),
    ("[imap]\nappend_limit = 'lots'\n", "[imap] append_limit: expected a size"),
    ("[imap]\nmax_line = 10\n", "[imap] max_line: must be between 1024 and 1048576, got 10"),
    ("[pop3]\nidle_timeout = 60\n", "[pop3] idle_timeout: RFC 1939 3 wants at least 600 seconds"),
    ("[pop3]\nuidl_format = '%q'\n", "[pop3] uidl_format: unknown % sequence"),
    ("[pop3]\nuidl_format = 'v%v'\n", "[pop3] uidl_format: must contain %f (the Maildir file name), or %u (the UID) with %v"),
    ("[pop3]\nuidl_format = '%u'\n", "[pop3] uidl_format: must contain %f (the Maildir file name), or %u"),
    ("[pop3]\nuidl_format = 'a b%f'\n", "[pop3] uidl_format: may contain only printable ASCII"),
    ("[pop3]\nuidl_format = ''\n", "[pop3] uidl_format: must not be empty"),
    ("[pop3]\nmark_seen = 'yes'\n", "[pop3] mark_seen: expected true or false, got a string"),
    ("[pop3]\nuidl = '%f'\n", "[pop3] uidl: unknown key"),
    ("[queue]\nrelay_host = 'smtp.example.com:99999'\n", "[queue] relay_host: '99999' is not a port number"),
    ("[queue]\nrelay_host = 'bad host'\n", "[queue] relay_host: 'bad host' is not a domain name"),
    ("[queue]\nrelay_user = 'me'\n", "[queue] relay_password_file: relay_user needs a relay_password_file"),
    ("[queue]\nrelay_password_file = 'pw'\n", "[queue] relay_user: relay_password_file is given but relay_user is empty"),
    ("[queue]\nrelay_user = 'me'\nrelay_password_file = 'pw'\n", "[queue] relay_user: AUTH credentials need a relay_host"),
    ("[queue]\ntls = 'yes'\n", "[queue] tls: must be one of 'may', 'encrypt', 'verify'"),
    ("[queue]\nnameservers = ['dns.example']\n", "[queue] nameservers: item 1 ('dns.example')"),
    ("[queue]\nmin_backoff = '5 minutes'\n", "[queue] min_backoff: expected a duration such as 300"),
    ("[queue]\nmax_lifetime = '400d'\n", "[queue] max_lifetime: must be between 0 seconds and 365 days"),
    ("[queue]\nmin_backoff = '2h'\nmax_backoff = '1h'\n", "[queue] max_backoff: must not be shorter than min_backoff"),
    ("[queue]\nmin_backoff = 0\n", "[queue] min_backoff: must be at least 1 second"),
    ("[queue]\nconnections = 10\nconnections_per_destination = 20\n", "[queue] connections_per_destination: must not be larger than connections"),
    ("[queue]\nconnect_timeout = 0\n", "[queue] connect_timeout: must be more than 0 seconds"),
    ("[queue]\nretry = 5\n", "[queue] retry: unknown key"),
    ("[limits]\nmax_login_failures = 0\n", "[limits] max_login_failures: must be between 1 and 1000000, got 0"),
    ("[limits]\nmax_connections = 1.5\n", "[limits] max_connections: expected an integer, got a number"),
    ("[server\n", "not valid TOML"),
]


@pytest.mark.parametrize("text, expected", BAD_CONFIGS)
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, expected):
    """
    config.load refuses the file with a ConfigError whose one-line message starts with the
    file's path and contains the table, the key and what is wrong.
    """
    path = tmp_path / "pymaild.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_missing_and_unreadable_config_file(tmp_path):
    """
    A missing file, a directory and an unreadable file each get their own one-line message.
    """
    with pytest.raises(ConfigError, match=r"nope.toml: no such file$"):
        config.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"is a directory"):
        config.load(tmp_path)
    if os.geteuid() != 0:  # root reads anything
        path = tmp_path / "secret.toml"
        path.write_text("")
        path.chmod(0)
        with pytest.raises(ConfigError, match="permission denied"):
            config.load(path)


def test_defaults_and_relative_paths(tmp_path):
    """
    Without keys the embedded defaults apply; relative paths are relative to the file's
    directory, and --data-dir to the current directory and wins over [server] data_dir.
    """
    path = tmp_path / "etc" / "pymaild.toml"
    path.parent.mkdir()
    path.write_text(
        "[server]\nhostname = 'MX.Example.COM.'\ndata_dir = 'data'\n"
        "[tls]\ncert = 'c.pem'\nkey = '/abs/k.pem'\n"
        "[auth]\npasswd_file = 'users'\n"
        "[listen]\nsmtp = ['0.0.0.0:25', '[::]:25']\nimaps = []\n"
    )
    c = config.load(path)
    assert c.server.hostname == "mx.example.com"
    assert c.server.data_dir == tmp_path / "etc" / "data"
    assert c.tls.cert == tmp_path / "etc" / "c.pem" and c.tls.key == Path("/abs/k.pem")
    assert c.auth.passwd_file == tmp_path / "etc" / "users" and c.auth.passwd_file_explicit
    assert c.auth.aliases_file == tmp_path / "etc" / "data" / "aliases" and not c.auth.aliases_file_explicit
    assert [str(a) for a in c.listen.smtp] == ["0.0.0.0:25", "[::]:25"]
    assert c.listen.imaps == ()
    assert [str(a) for a in c.listen.pop3s] == ["127.0.0.1:2995"]
    assert c.domains.local == ("localhost", "mx.example.com")
    assert c.auth.plaintext_networks == () and c.smtp.trusted_networks == ()
    assert c.store.quota_storage == 0 and c.store.specialFolders["\\Sent"] == "Sent"


    os.chdir(tmp_path)
    c = config.load(path, data_dir="elsewhere")
    assert c.server.data_dir == tmp_path / "elsewhere"
    assert c.auth.passwd_file == tmp_path / "etc" / "users"
    assert c.auth.aliases_file == tmp_path / "elsewhere" / "aliases"


def test_describe_round_trips(tmp_path):
    """
    The effective configuration printed by check-config is itself a valid file that loads to
    the same listeners, domains and networks.
    """
    path = tmp_path / "a.toml"
    path.write_text("[smtp]\ntrusted_networks = ['192.0.2.0/24']\n[domains]\nlocal = ['example.com']\n")
    first = config.load(path)
    second_path = tmp_path / "b.toml"
    second_path.write_text(first.describe().replace('cert = ""', "").replace('key = ""', ""))
    second = config.load(second_path)
    assert second.listen == first.listen
    assert second.domains == first.domains
    assert second.smtp == first.smtp


# --- the same mistakes through twistd: exit 2, one line, nothing bound ----------------------


STARTUP_ERRORS = [
    ("[server]\nhostnme = 'x'\n", "[server] hostnme: unknown key"),
    ("[tls]\ncert = 'missing.pem'\nkey = 'missing.key'\n", "[tls] cert: {dir}/missing.pem: no such file"),
    ("[tls]\ncert = 'garbage.pem'\nkey = 'garbage.pem'\n", "[tls] cert: {dir}/garbage.pem: no PEM certificate in the file"),
    ("[tls]\ncert = 'good.pem'\nkey = 'garbage.pem'\n", "[tls] key: {dir}/garbage.pem: not a PEM private key"),
    ("[tls]\ncert = 'good.pem'\nkey = 'other.key'\n", "[tls] key: {dir}/other.key: does not match the certificate in {dir}/good.pem"),
    ("[auth]\npasswd_file = 'no-such-passwd'\n", "[auth] passwd_file: {dir}/no-such-passwd: no such file"),
    ("[auth]\naliases_file = 'no-such-aliases'\n", "[auth] aliases_file: {dir}/no-such-aliases: no such file"),
    ("[auth]\naliases_file = 'bad-aliases'\n", "[auth] aliases_file: {dir}/bad-aliases:2:"),
    ("[server]\ndata_dir = 'afile'\n", "[server] data_dir: {dir}/afile: not a directory"),
]


@pytest.mark.parametrize("text, expected", STARTUP_ERRORS)
def test_startup_error_exits_2_with_one_line(tmp_path, text, expected):
    """
    twistd -n pymaild --config FILE with a mistake prints `pymaild: FILE: [table] key: ...` as
    its only line on stderr, exits 2, shows no traceback and binds nothing.
    """
    from pymaild.tls import generateSelfSigned

    generateSelfSigned(tmp_path / "good.pem", tmp_path / "good.key", "localhost")
    generateSelfSigned(tmp_path / "other.pem", tmp_path / "other.key", "localhost")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "bad-aliases").write_text("# fine\nthis line has no colon\n")
    (tmp_path / "afile").write_text("")
    ports = free_ports(7)
    names = ("smtp", "submission", "smtps", "imap", "imaps", "pop3", "pop3s")
    listen = "[listen]\n" + "".join(f'{n} = ["127.0.0.1:{p}"]\n' for n, p in zip(names, ports))
    path = tmp_path / "pymaild.toml"
    path.write_text(listen + text)
    data_args = () if "data_dir" in text else ("--data-dir", str(tmp_path / "data"))
    result = run_twistd("--config", str(path), *data_args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"pymaild: {path}: ")
    assert expected.format(dir=tmp_path) in lines[0]
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_tls_options_use_no_deprecated_pyopenssl_objects(tmp_path):
    """
    The server's TLS context is made from cryptography's certificate and key objects, with the
    chain after the leaf: no DeprecationWarning from pyOpenSSL (its X509 and PKey, deprecated
    in 24.3), and the context serves the leaf.
    """
    import warnings

    from cryptography import x509
    from OpenSSL import SSL
    from pymaild.tls import ServerTLS, generateSelfSigned

    generateSelfSigned(tmp_path / "leaf.pem", tmp_path / "leaf.key", "localhost")
    generateSelfSigned(tmp_path / "ca.pem", tmp_path / "ca.key", "ca.test")
    chain = tmp_path / "chain.pem"
    chain.write_bytes((tmp_path / "leaf.pem").read_bytes() + (tmp_path / "ca.pem").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        server = ServerTLS(chain, tmp_path / "leaf.key", "TLSv1.2", "test")
        connection = SSL.Connection(server.options.getContext(), None)
    leaf = x509.load_pem_x509_certificate((tmp_path / "leaf.pem").read_bytes())
    assert connection.get_certificate().to_cryptography() == leaf


@pytest.mark.parametrize("text, expected", [("1048576", 1048576), ("'512M'", 512 << 20), ("'2G'", 2 << 30),
                                            ("'10k'", 10240), ("'3GB'", 3 << 30), ("0", 0)])
def test_sizes(tmp_path, text, expected):
    """
    Sizes are bytes or a number with a K, M, G or T suffix.
    """
    path = tmp_path / "s.toml"
    path.write_text(f"[store]\nquota_storage = {text}\n")
    assert config.load(path).store.quota_storage == expected
