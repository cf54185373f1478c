"""Kafka SASL and TLS settings: options -> aiokafka keyword arguments, inconsistent or
unreadable settings refused with the option's name, and passwords that never show in a
repr, a log or the help."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import ssl

import pytest

from eventbus import security
from eventbus.publisher import Publisher, PublisherOptions
from eventbus.security import KafkaSecurity, KafkaSecurityError, Secret, read_secret

PASSWORD = "s3cr3t-Kafka-pa55word"
KEY_PASSWORD = "k3y-pa55word-for-the-pem"


# -- certificates, made here ----------------------------------------------------------------


def make_pki(folder, key_password: str | None = None) -> dict[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer_name, issuer_key, ca: bool):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vigil test CA")])
    ca = cert("vigil test CA", ca_key, ca_name, ca_key, ca=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = cert("vigil client", client_key, ca_name, ca_key, ca=False)
    encryption = (serialization.BestAvailableEncryption(key_password.encode()) if key_password
                  else serialization.NoEncryption())
    paths = {"ca": folder / "ca.pem", "cert": folder / "client.pem", "key": folder / "client.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(client_key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8, encryption))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def encrypted_pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki-encrypted"), key_password=KEY_PASSWORD)


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "kafka-password"
    path.write_text(PASSWORD + "\n")
    return str(path)


def parse(argv: list[str], environ: dict | None = None) -> KafkaSecurity:
    """The --kafka-* options as `vigil` parses them (vigil.cli.option, reading VIGIL_* too)."""
    from vigil.cli import option

    saved = {k: v for k, v in os.environ.items() if k.startswith("VIGIL_KAFKA_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(environ or {})
    try:
        p = argparse.ArgumentParser()
        security.add_options(p, option)
        args = p.parse_args(argv)
        return security.from_args(args, environ=os.environ)
    finally:
        for k in [k for k in os.environ if k.startswith("VIGIL_KAFKA_")]:
            del os.environ[k]
        os.environ.update(saved)


# -- options -> aiokafka kwargs ----------------------------------------------------------------


def test_nothing_set_is_plaintext_with_no_kwargs():
    s = parse([])
    assert s.protocol == "PLAINTEXT" and s.client_kwargs() == {}


@pytest.mark.parametrize("mechanism", security.MECHANISMS)
def test_sasl_with_a_password_file_defaults_to_sasl_ssl(password_file, mechanism):
    s = parse(["--kafka-sasl-mechanism", mechanism, "--kafka-sasl-username", "vigil",
               "--kafka-sasl-password-file", password_file])
    kw = s.client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == mechanism
    assert kw["sasl_plain_username"] == "vigil" and kw["sasl_plain_password"] == PASSWORD  # newline dropped
    assert isinstance(kw["ssl_context"], ssl.SSLContext) and kw["ssl_context"].check_hostname
    assert kw["ssl_context"].verify_mode == ssl.CERT_REQUIRED  # the system's CAs


def test_sasl_plaintext_by_name_with_the_password_from_the_environment(caplog):
    caplog.set_level(logging.WARNING, logger="eventbus.security")
    s = parse(["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN",
               "--kafka-sasl-username", "vigil"], {"VIGIL_KAFKA_SASL_PASSWORD": PASSWORD})
    assert s.client_kwargs() == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                                 "sasl_plain_username": "vigil", "sasl_plain_password": PASSWORD}
    assert "unencrypted" in caplog.text and PASSWORD not in caplog.text


def test_options_from_the_environment(password_file, pki):
    s = parse([], {"VIGIL_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "VIGIL_KAFKA_SASL_USERNAME": "svc",
                   "VIGIL_KAFKA_SASL_PASSWORD_FILE": password_file, "VIGIL_KAFKA_SSL_CAFILE": pki["ca"]})
    kw = s.client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_password"] == PASSWORD


def test_tls_with_a_ca_and_a_client_certificate(pki):
    s = parse(["--kafka-ssl-cafile", pki["ca"], "--kafka-ssl-certfile", pki["cert"],
               "--kafka-ssl-keyfile", pki["key"]])
    kw = s.client_kwargs()
    assert set(kw) == {"security_protocol", "ssl_context"} and kw["security_protocol"] == "SSL"
    ctx = kw["ssl_context"]
    assert [dict(c["subject"][0])["commonName"] for c in ctx.get_ca_certs()] == ["vigil test CA"]
    assert ctx.check_hostname
    assert s.client_kwargs()["ssl_context"] is ctx  # one context for every client
    s = parse(["--kafka-ssl-cafile", pki["ca"], "--kafka-ssl-no-hostname-check"])
    assert not s.client_kwargs()["ssl_context"].check_hostname


def test_an_encrypted_client_key_with_its_password(encrypted_pki, tmp_path):
    path = tmp_path / "key-password"
    path.write_text(KEY_PASSWORD)
    args = ["--kafka-ssl-cafile", encrypted_pki["ca"], "--kafka-ssl-certfile", encrypted_pki["cert"],
            "--kafka-ssl-keyfile", encrypted_pki["key"]]
    assert parse([*args, "--kafka-ssl-key-password-file", str(path)]).client_kwargs()["security_protocol"] == "SSL"
    assert parse(args, {"VIGIL_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD}).ssl_context() is not None
    with pytest.raises(KafkaSecurityError, match="^--kafka-ssl-keyfile: cannot load") as err:
        parse(args, {"VIGIL_KAFKA_SSL_KEY_PASSWORD": "not-the-key-password"})
    assert "not-the-key-password" not in str(err.value)


# -- bad combinations ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, environ, message", [
    (["--kafka-sasl-mechanism", "PLAIN"], {"VIGIL_KAFKA_SASL_PASSWORD": PASSWORD},
     "--kafka-sasl-username: required with --kafka-sasl-mechanism PLAIN"),
    (["--kafka-sasl-mechanism", "SCRAM-SHA-256", "--kafka-sasl-username", "u"], {},
     "--kafka-sasl-password-file (or $VIGIL_KAFKA_SASL_PASSWORD): required with --kafka-sasl-mechanism SCRAM-SHA-256"),
    (["--kafka-sasl-username", "u"], {}, "--kafka-sasl-mechanism: required with --kafka-sasl-username"),
    ([], {"VIGIL_KAFKA_SASL_PASSWORD": PASSWORD}, "--kafka-sasl-mechanism: required with a SASL password"),
    (["--kafka-security-protocol", "SASL_SSL"], {}, "--kafka-sasl-mechanism: required with --kafka-security-protocol"),
    (["--kafka-security-protocol", "PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "u"],
     {"VIGIL_KAFKA_SASL_PASSWORD": PASSWORD}, "--kafka-security-protocol: PLAINTEXT carries no SASL"),
    (["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username",
      "u", "--kafka-ssl-cafile", "/etc/hostname"], {"VIGIL_KAFKA_SASL_PASSWORD": PASSWORD},
     "--kafka-security-protocol: SASL_PLAINTEXT does not use TLS, but --kafka-ssl-cafile is set"),
    (["--kafka-ssl-cafile", "/nonexistent/ca.pem"], {}, "--kafka-ssl-cafile: cannot read /nonexistent/ca.pem"),
    (["--kafka-ssl-certfile", "/nonexistent/c.pem"], {}, "--kafka-ssl-certfile: cannot read"),
    (["--kafka-ssl-keyfile", "/etc/hostname"], {}, "--kafka-ssl-certfile: required with --kafka-ssl-keyfile"),
])
def test_bad_combinations_name_the_option(argv, environ, message):
    with pytest.raises(KafkaSecurityError) as err:
        parse(argv, environ)
    assert str(err.value).startswith(message), str(err.value)
    assert PASSWORD not in str(err.value)


def test_unreadable_or_wrong_files(tmp_path, password_file):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("this is not a certificate\n")
    with pytest.raises(KafkaSecurityError, match=r"^--kafka-ssl-cafile: .*ca.pem holds no usable PEM"):
        parse(["--kafka-ssl-cafile", str(not_pem)])
    locked = tmp_path / "locked.pem"
    locked.write_text("x")
    locked.chmod(0)
    if not os.access(locked, os.R_OK):  # root reads anything
        with pytest.raises(KafkaSecurityError, match="^--kafka-ssl-cafile: cannot read"):
            parse(["--kafka-ssl-cafile", str(locked)])
    with pytest.raises(KafkaSecurityError, match="^--kafka-sasl-password-file: cannot read /nonexistent"):
        parse(["--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "u",
               "--kafka-sasl-password-file", "/nonexistent"])
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(KafkaSecurityError, match="^--kafka-sasl-password-file: .* is empty"):
        parse(["--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "u", "--kafka-sasl-password-file",
               str(empty)])
    with pytest.raises(KafkaSecurityError, match="^--kafka-sasl-password-file: set either it or "
                                                 r"\$VIGIL_KAFKA_SASL_PASSWORD, not both"):
        parse(["--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "u", "--kafka-sasl-password-file",
               password_file], {"VIGIL_KAFKA_SASL_PASSWORD": PASSWORD})


def test_vigil_refuses_to_start_naming_the_option(capsys, restore_logging):
    from vigil.cli import main

    assert main(["events", "tail", "--bootstrap-servers", "127.0.0.1:1", "--kafka-sasl-mechanism", "PLAIN",
                 "--kafka-sasl-username", "u"]) == 2
    assert "--kafka-sasl-password-file (or $VIGIL_KAFKA_SASL_PASSWORD): required" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "up"])
def test_the_server_and_vigil_up_take_the_settings(command, password_file):
    """The event publisher and the rollout follower of `vigil serve` (and what `vigil up`
    hands its children) use the same settings as every other client."""
    from inference.cli import server_options
    from vigil.cli import build_parser

    args = build_parser().parse_args([command, "--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "u",
                                      "--kafka-sasl-password-file", password_file])
    s = server_options(args).events.security
    assert s == parse(["--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "u",
                       "--kafka-sasl-password-file", password_file])
    assert s.client_kwargs()["sasl_plain_username"] == "u"


# -- the secret never shows --------------------------------------------------------------------


def test_secret_hidden_in_reprs(password_file, encrypted_pki):
    s = parse(["--kafka-sasl-mechanism", "SCRAM-SHA-256", "--kafka-sasl-username", "vigil",
               "--kafka-sasl-password-file", password_file, "--kafka-ssl-cafile", encrypted_pki["ca"],
               "--kafka-ssl-certfile", encrypted_pki["cert"], "--kafka-ssl-keyfile", encrypted_pki["key"]],
              {"VIGIL_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD})
    from alerting.service import ServiceOptions as AlertingOptions
    from inference.api.options import EventOptions, ServerOptions
    from rollout.service import ServiceOptions as RolloutOptions

    shown = [repr(s), str(s), f"{s}", s.describe(), repr(s.sasl_password), str(s.ssl_key_password),
             repr(PublisherOptions("b:9092", "/tmp/o", security=s)),
             repr(ServerOptions(events=EventOptions(bootstrap_servers="b:9092", security=s))),
             repr(AlertingOptions("b:9092", [], "", security=s)), repr(RolloutOptions(security=s))]
    for text in shown:
        assert PASSWORD not in text and KEY_PASSWORD not in text, text
    assert "Secret(hidden, from file " in repr(s) and "$VIGIL_KAFKA_SSL_KEY_PASSWORD" in repr(s)
    assert s.sasl_password.reveal() == PASSWORD
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(s.sasl_password)


def test_help_and_namespace_never_hold_the_password(password_file, capsys):
    from vigil.cli import build_parser

    os.environ["VIGIL_KAFKA_SASL_PASSWORD"] = PASSWORD
    try:
        parser = build_parser()
        for command in (["serve"], ["up"], ["alerting"], ["rollout"], ["events", "tail"]):
            with pytest.raises(SystemExit):
                parser.parse_args([*command, "--help"])
            assert PASSWORD not in capsys.readouterr().out
        args = parser.parse_args(["serve", "--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "u"])
        assert PASSWORD not in repr(vars(args))
    finally:
        del os.environ["VIGIL_KAFKA_SASL_PASSWORD"]


async def test_secret_not_in_logs_while_clients_connect(tmp_path, caplog):
    """A publisher with SASL against a port nobody listens on, with every logger at DEBUG
    (aiokafka's included): the password is in none of the lines."""
    from eventbus.broker import free_port

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="aiokafka")
    s = KafkaSecurity(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="vigil",
                      sasl_password=Secret(PASSWORD, "test"))
    publisher = Publisher(PublisherOptions(f"127.0.0.1:{free_port()}", str(tmp_path / "outbox"), security=s,
                                           publish_timeout_ms=300))
    logging.getLogger("test").info("options: %s %r", publisher.options, s)
    await publisher.start()
    publisher.publish("vigil.feedback", "k", {"request_id": "r", "model": "m", "version": "1", "label": "x"})
    await publisher.stop()
    assert caplog.records and "vigil" in caplog.text
    assert PASSWORD not in caplog.text


def test_children_get_the_settings_without_the_password_in_argv(password_file):
    s = parse(["--kafka-sasl-mechanism", "PLAIN", "--kafka-sasl-username", "u",
               "--kafka-sasl-password-file", password_file])
    env = s.env()
    assert env["VIGIL_KAFKA_SASL_PASSWORD_FILE"] == password_file and "VIGIL_KAFKA_SASL_PASSWORD" not in env
    assert parse([], env) == s  # a child reading them builds the same settings
    s = parse(["--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "PLAIN",
               "--kafka-sasl-username", "u"], {"VIGIL_KAFKA_SASL_PASSWORD": PASSWORD})
    assert s.env()["VIGIL_KAFKA_SASL_PASSWORD"] == PASSWORD  # passed on in the environment, as it came


def test_read_secret_drops_one_newline_only(tmp_path):
    path = tmp_path / "p"
    path.write_text(" spaced \n\n")
    assert read_secret("--x", str(path), "", {}).reveal() == " spaced \n"
