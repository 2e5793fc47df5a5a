package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// servedCert makes a TLS handshake with a server using c and returns the leaf it served.
func servedCert(t *testing.T, c *certFiles) *x509.Certificate {
	t.Helper()
	client, server := net.Pipe()
	defer client.Close()
	go func() {
		defer server.Close()
		tls.Server(server, &tls.Config{GetCertificate: c.get}).Handshake()
	}()
	conn := tls.Client(client, &tls.Config{InsecureSkipVerify: true})
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := conn.Handshake(); err != nil {
		t.Fatal(err)
	}
	return conn.ConnectionState().PeerCertificates[0]
}

// leafOf is the certificate in the PEM file path.
func leafOf(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, _ := os.ReadFile(path)
	block, _ := pem.Decode(b)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// TestCertificateReload: renewed --cert_path and --key_path files are served from the next
// handshake on; a mismatched or expired new pair is logged and the last good one kept.
func TestCertificateReload(t *testing.T) {
	dir, other := t.TempDir(), t.TempDir()
	now := time.Now()
	certPath, keyPath := writeCert(t, dir, now.Add(-time.Hour), now.Add(time.Hour))
	first := leafOf(t, certPath)
	var logs bytes.Buffer
	c := &certFiles{certPath: certPath, keyPath: keyPath, log: slog.New(slog.NewTextHandler(&logs, nil))}
	if err := c.load(now); err != nil {
		t.Fatal(err)
	}
	if got := servedCert(t, c); !got.Equal(first) {
		t.Fatalf("served %v; want the first pair", got.SerialNumber)
	}

	writeCert(t, dir, now.Add(-time.Hour), now.Add(2*time.Hour)) // renewed in place
	second := leafOf(t, certPath)
	if got := servedCert(t, c); !got.Equal(second) {
		t.Fatalf("after renewal served %v; want the second pair %v", got.SerialNumber, second.SerialNumber)
	}

	// A new certificate whose key is not (yet) the new one: the second pair stays.
	otherCert, otherKey := writeCert(t, other, now.Add(-time.Hour), now.Add(time.Hour))
	copyFile(t, otherCert, certPath)
	if got := servedCert(t, c); !got.Equal(second) || !strings.Contains(logs.String(), "private key does not match") {
		t.Fatalf("mismatched pair: served %v, logged %q; want the second pair kept and the error logged", got.SerialNumber, logs.String())
	}
	copyFile(t, otherKey, keyPath) // the key follows: the pair matches again
	if got := servedCert(t, c); !got.Equal(leafOf(t, otherCert)) {
		t.Fatalf("served %v; want the completed new pair", got.SerialNumber)
	}

	// An expired pair is refused the same way.
	logs.Reset()
	kept := leafOf(t, certPath)
	writeCert(t, dir, now.Add(-48*time.Hour), now.Add(-24*time.Hour))
	if got := servedCert(t, c); !got.Equal(kept) || !strings.Contains(logs.String(), "valid only from") {
		t.Fatalf("expired pair: served %v, logged %q; want the last good pair kept", got.SerialNumber, logs.String())
	}
	// Logged once per change, not at every handshake.
	n := strings.Count(logs.String(), "keeping the certificate in use")
	servedCert(t, c)
	if m := strings.Count(logs.String(), "keeping the certificate in use"); m != n {
		t.Errorf("the same refused pair was logged again: %d times, then %d", n, m)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err == nil {
		tmp := filepath.Join(filepath.Dir(to), ".tmp")
		if err = os.WriteFile(tmp, b, 0o600); err == nil {
			err = os.Rename(tmp, to) // as certbot and most tools replace files
		}
	}
	if err != nil {
		t.Fatal(err)
	}
}
