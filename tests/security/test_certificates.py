"""The local CA and certificates ``relaygate up`` and the test stacks issue (services/stack_certs.py)."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.tls import CA_FILE, CERT_FILE, IDENTITIES, KEY_FILE, server_name
from services.stack_certs import CA_KEY_FILE, ensure_certificates, subject_names


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_every_file_is_private_to_its_owner(tmp_path: Path) -> None:
    root = tmp_path / "tls"
    ensure_certificates(root)
    found = modes(root)
    assert {name for name, mode in found.items() if (root / name).is_dir() and mode != 0o700} == set()
    assert {name for name, mode in found.items() if (root / name).is_file() and mode != 0o600} == set()
    expected = {CA_FILE, CA_KEY_FILE} | {
        f"{i}/{f}" for i in IDENTITIES for f in (CERT_FILE, KEY_FILE, CA_FILE)
    }
    assert {name for name in found if (root / name).is_file()} == expected


def test_each_identity_has_its_name_and_the_ca_signs_it(tmp_path: Path) -> None:
    certs = ensure_certificates(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate((certs.root / CA_FILE).read_bytes())
    for identity in IDENTITIES:
        issued = x509.load_pem_x509_certificate((certs.directory(identity) / CERT_FILE).read_bytes())
        names = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName)[0] == server_name(identity)
        assert set(names) == set(subject_names(identity))
        issued.verify_directly_issued_by(ca)
        assert (certs.directory(identity) / CA_FILE).read_bytes() == (certs.root / CA_FILE).read_bytes()


def test_a_later_start_keeps_them_and_renews_one_about_to_expire(tmp_path: Path) -> None:
    root = tmp_path / "tls"
    first = ensure_certificates(root)
    before = {i: (first.directory(i) / CERT_FILE).read_bytes() for i in IDENTITIES}
    (first.directory("quota") / KEY_FILE).chmod(0o644)  # loosened by hand: tightened again
    ensure_certificates(root)
    assert {i: (root / i / CERT_FILE).read_bytes() for i in IDENTITIES} == before
    assert stat.S_IMODE((root / "quota" / KEY_FILE).stat().st_mode) == 0o600

    # A certificate within 30 days of its end is issued again, by the same CA.
    ca = x509.load_pem_x509_certificate((root / CA_FILE).read_bytes())
    relay = x509.load_pem_x509_certificate(before["relay"])
    assert relay.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=300)
    (root / "relay" / CERT_FILE).write_bytes(_expiring_copy(root))
    ensure_certificates(root)
    renewed = x509.load_pem_x509_certificate((root / "relay" / CERT_FILE).read_bytes())
    assert renewed.serial_number != relay.serial_number
    renewed.verify_directly_issued_by(ca)


def test_the_relay_names_its_local_addresses_and_an_older_set_is_issued_again(tmp_path: Path) -> None:
    root = tmp_path / "tls"
    ensure_certificates(root)
    relay = x509.load_pem_x509_certificate((root / "relay" / CERT_FILE).read_bytes())
    names = relay.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [server_name("relay"), "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    quota = x509.load_pem_x509_certificate((root / "quota" / CERT_FILE).read_bytes())
    only = quota.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(only) == [x509.DNSName(server_name("quota"))]

    # A relay certificate from before (its identity's name only) is issued again on the next start.
    (root / "relay" / CERT_FILE).write_bytes(_expiring_copy(root, days=300, names=[server_name("relay")]))
    ensure_certificates(root)
    renewed = x509.load_pem_x509_certificate((root / "relay" / CERT_FILE).read_bytes())
    assert set(renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == set(
        subject_names("relay")
    )


def _expiring_copy(root: Path, *, days: int = 10, names: list[str] | None = None) -> bytes:
    """The relay's certificate re-signed by the CA to end in ten days."""
    key = serialization.load_pem_private_key((root / CA_KEY_FILE).read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((root / CA_FILE).read_bytes())
    current = x509.load_pem_x509_certificate((root / "relay" / CERT_FILE).read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(current.subject)
        .issuer_name(ca.subject)
        .public_key(current.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    for extension in current.extensions:
        value = extension.value
        if names is not None and isinstance(value, x509.SubjectAlternativeName):
            value = x509.SubjectAlternativeName([x509.DNSName(name) for name in names])
        builder = builder.add_extension(value, critical=extension.critical)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
