"""
examples/plugins/typo_domains.py, the plugin docs/plugins.md walks through: its own tests with
pymaild.testing (as its author would write them), and end to end in a twistd pymaild that finds
it through [plugins] paths.
"""

from __future__ import annotations

import importlib.util
import smtplib
from pathlib import Path

import pytest

from pymaild.errors import ConfigError
from pymaild.testing import PluginHarness

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "plugins"


def example():
    spec = importlib.util.spec_from_file_location("typo_domains_example", EXAMPLES / "typo_domains.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_refuses_typo_domains_only(tmp_path):
    h = PluginHarness(example().plugin, {"domains": {"gmial.com": "gmail.com"}}, tmp_path)
    session, t = h.session(user="me@example.com", protocol="submission"), h.transaction("me@example.com")
    verdict = h.call("rcptTo", session, t, h.recipient("Anne@GMIAL.com", "remote"))
    assert (verdict.action, verdict.code, verdict.status) == ("reject", 550, "5.1.2")
    assert verdict.text == "No such domain gmial.com: did you mean Anne@gmail.com?"
    assert h.call("rcptTo", session, t, h.recipient("anne@gmail.com", "remote")).action == "continue"


def test_the_example_checks_its_settings(tmp_path):
    with pytest.raises(ConfigError, match=r"\[plugins.typo-domains\] domains: 'not a domain!' is not a domain name"):
        PluginHarness(example().plugin, {"domains": {"not a domain!": "gmail.com"}}, tmp_path)
    with pytest.raises(ValueError, match="domains is empty"):
        PluginHarness(example().plugin, {}, tmp_path)


def test_the_example_in_a_running_server(make_server):
    server = make_server(f'[plugins]\nenabled = ["typo-domains"]\npaths = ["{EXAMPLES}"]\n'
                         '[plugins.typo-domains]\ndomains = {"gmial.com" = "gmail.com"}\naudit = true\n').start()
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=30) as s:
        s.starttls(context=server.tls())
        s.login("postmaster@localhost", server.postmaster_password())
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("postmaster@localhost", ["anne@gmial.com"], b"Subject: hi\r\n\r\nhi\r\n")
        assert e.value.recipients["anne@gmial.com"] == (550, b"5.1.2 No such domain gmial.com: did you mean anne@gmail.com?")
        s.sendmail("postmaster@localhost", ["anne@gmail.com"], b"Subject: hi\r\n\r\nhi\r\n")
    assert "typo-domains: postmaster@localhost (127.0.0.1) wrote to anne@gmial.com" in server.log()
