package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// freePort returns a loopback port that was free a moment ago.
// freePort returns a port free on every interface, below Linux's ephemeral range
// (32768-60999), from which outgoing connections take their ports: one of the many
// connections the tests open cannot take it before the broker listens on it.
func freePort(t *testing.T) int {
	t.Helper()
	for range 100 {
		port := 20000 + mrand.IntN(12000)
		if ln, err := net.Listen("tcp", fmt.Sprintf(":%d", port)); err == nil {
			ln.Close()
			return port
		}
	}
	t.Fatal("no free port between 20000 and 32000")
	return 0
}

// writeCert writes a self-signed certificate for localhost valid from notBefore to notAfter.
func writeCert(t *testing.T, dir string, notBefore, notAfter time.Time) (certPath, keyPath string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "localhost"},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore: notBefore, NotAfter: notAfter, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	certPath, keyPath = filepath.Join(dir, "chain.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return certPath, keyPath
}

// startRun runs the broker in-process with args and returns a channel with run's result.
func startRun(t *testing.T, args ...string) (<-chan error, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"--ntp_server=", "--db", t.TempDir()}, args...), noEnv, io.Discard, io.Discard)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Error("broker did not stop within 20 s")
		}
	})
	return done, cancel
}

// waitUp polls url until it answers, failing after 30 s.
func waitUp(t *testing.T, client *http.Client, url string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not up: %v", url, err)
		}
	}
}

func TestOwnCertificate(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath := writeCert(t, dir, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	httpsPort, httpPort := freePort(t), freePort(t)
	startRun(t, "--secure", "--auto_cert=false", "--jwt_secret=0123456789abcdef0123456789abcdef", "--admin_token=admin-0123456789",
		"--cert_path", certPath, "--key_path", keyPath, "--https_port", fmt.Sprint(httpsPort), "--http_port", fmt.Sprint(httpPort))
	pool := x509.NewCertPool()
	pem, _ := os.ReadFile(certPath)
	pool.AppendCertsFromPEM(pem)
	base := fmt.Sprintf("https://localhost:%d", httpsPort)
	for _, h2 := range []bool{true, false} {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: h2}
		if !h2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		client := &http.Client{Transport: tr}
		waitUp(t, client, base+"/")
		post := func(path, body string, hdr ...string) string {
			req, _ := http.NewRequest("POST", base+path, strings.NewReader(body))
			for i := 0; i+1 < len(hdr); i += 2 {
				req.Header.Set(hdr[i], hdr[i+1])
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			out, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != 200 {
				t.Fatalf("%s: %d %s", path, resp.StatusCode, out)
			}
			if want := map[bool]int{true: 2, false: 1}[h2]; resp.ProtoMajor != want {
				t.Errorf("%s over HTTP/%d; want HTTP/%d", path, resp.ProtoMajor, want)
			}
			return string(out)
		}
		user := fmt.Sprint("u", h2)
		post("/create_user", `{"username":"`+user+`","password":"pw","admin_token":"admin-0123456789","tenant_name":"t"}`)
		jwt := strings.Split(post("/login", `{"username":"`+user+`","password":"pw"}`), `"`)[3]
		s := openStream(t, base+"/sse", client, bearer(jwt)...)
		post("/insert", `{"event":"secure","data":{"ok":true}}`, bearer(jwt)...)
		if ev := s.next(); ev.name != "secure" || ev.data != `{"ok":true}` {
			t.Errorf("event over TLS (h2 %v): %+v", h2, ev)
		}
	}
	// Plain HTTP redirects to HTTPS.
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(fmt.Sprintf("http://localhost:%d/list_users?x=1", httpPort))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if loc := resp.Header.Get("Location"); resp.StatusCode != 301 || loc != base+"/list_users?x=1" {
		t.Errorf("plain HTTP: got %d to %q; want 301 to %s/list_users?x=1", resp.StatusCode, loc, base)
	}
}

func TestOwnCertificateRefusedAtStart(t *testing.T) {
	dir := t.TempDir()
	expired, key := writeCert(t, dir, time.Now().Add(-48*time.Hour), time.Now().Add(-24*time.Hour))
	other := t.TempDir()
	_, otherKey := writeCert(t, other, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	good, _ := writeCert(t, t.TempDir(), time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	cases := []struct{ cert, key, want string }{
		{expired, key, "valid only from"},
		{good, otherKey, "private key does not match"},
		{filepath.Join(dir, "missing.pem"), key, "no such file"},
	}
	for _, c := range cases {
		err := run(context.Background(), []string{"--ntp_server=", "--db", t.TempDir(), "--secure", "--auto_cert=false", "--jwt_secret=0123456789abcdef0123456789abcdef", "--admin_token=admin-0123456789",
			"--cert_path", c.cert, "--key_path", c.key, "--https_port", fmt.Sprint(freePort(t)), "--http_port", fmt.Sprint(freePort(t))}, noEnv, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("start with %s: got %v; want an error containing %q", filepath.Base(c.cert), err, c.want)
		}
	}
}

// testBin is where buildBroker puts the broker binary; TestMain removes it.
func testBin() string { return filepath.Join(os.TempDir(), fmt.Sprintf("broker-test-%d", os.Getpid())) }

func TestMain(m *testing.M) {
	code := m.Run()
	os.Remove(testBin())
	os.Exit(code)
}

// buildBroker builds the broker binary once per test binary run.
func buildBroker(t *testing.T) string {
	t.Helper()
	bin := testBin()
	if _, err := os.Stat(bin); err != nil {
		if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, out)
		}
	}
	return bin
}

// TestAutoCertificate runs the broker against Pebble, Let's Encrypt's test ACME server: the
// broker must obtain a certificate for its domain issued by Pebble's root, and reuse it from
// --certs after a restart. autocert refuses single-label names such as localhost and no
// resolver here maps a test domain to loopback, so Pebble skips the challenge validation
// (PEBBLE_VA_ALWAYS_VALID) and clients dial 127.0.0.1 with the domain as server name.
func TestAutoCertificate(t *testing.T) {
	gobin := t.TempDir()
	cmd := exec.Command("go", "install", "github.com/letsencrypt/pebble/v2/cmd/pebble@v2.10.3")
	cmd.Env = append(os.Environ(), "GOBIN="+gobin)
	if out, err := cmd.CombinedOutput(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("go install pebble: %v\n%s", err, out)
		}
		t.Skipf("cannot build Pebble: %v\n%s", err, out)
	}
	modcache, _ := exec.Command("go", "env", "GOMODCACHE").Output()
	pebbleDir := filepath.Join(strings.TrimSpace(string(modcache)), "github.com/letsencrypt/pebble/v2@v2.10.3")
	acmePort, mgmtPort, httpPort, httpsPort := freePort(t), freePort(t), freePort(t), freePort(t)
	cfg := filepath.Join(t.TempDir(), "pebble.json")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`{"pebble": {"listenAddress": "127.0.0.1:%d", "managementListenAddress": "127.0.0.1:%d",
		"certificate": "test/certs/localhost/cert.pem", "privateKey": "test/certs/localhost/key.pem",
		"httpPort": %d, "tlsPort": %d, "ocspResponderURL": "", "externalAccountBindingRequired": false}}`, acmePort, mgmtPort, httpPort, httpsPort)), 0o600)
	pebble := exec.Command(filepath.Join(gobin, "pebble"), "-config", cfg)
	pebble.Dir = pebbleDir
	pebble.Env = append(os.Environ(), "PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0", "PEBBLE_VA_ALWAYS_VALID=1")
	pebble.Stdout, pebble.Stderr = io.Discard, io.Discard
	if err := pebble.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pebble.Process.Kill(); pebble.Wait() })
	pebbleCA := filepath.Join(pebbleDir, "test/certs/pebble.minica.pem")
	caPool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(pebbleCA)
	caPool.AppendCertsFromPEM(caPEM)
	toPebble := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: caPool}}}
	waitUp(t, toPebble, fmt.Sprintf("https://localhost:%d/dir", acmePort))

	bin, dir := buildBroker(t), t.TempDir()
	start := func() *exec.Cmd {
		b := exec.Command(bin, "--secure", "--domain", "broker.test", "--acme_directory", fmt.Sprintf("https://localhost:%d/dir", acmePort),
			"--certs", filepath.Join(dir, "certs"), "--db", filepath.Join(dir, "db"), "--http_port", fmt.Sprint(httpPort),
			"--https_port", fmt.Sprint(httpsPort), "--jwt_secret", "0123456789abcdef0123456789abcdef", "--admin_token", "admin-0123456789", "--ntp_server=")
		b.Env = append(os.Environ(), "SSL_CERT_FILE="+pebbleCA) // trust Pebble's directory
		b.Stderr = os.Stderr
		if err := b.Start(); err != nil {
			t.Fatal(err)
		}
		return b
	}
	stop := func(b *exec.Cmd) {
		b.Process.Signal(syscall.SIGTERM)
		b.Wait()
	}
	// The served chain must lead to Pebble's root, which Pebble generates at start.
	rootPEM := func() *x509.CertPool {
		resp, err := toPebble.Get(fmt.Sprintf("https://localhost:%d/roots/0", mgmtPort))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(body) {
			t.Fatalf("pebble root: %s", body)
		}
		return pool
	}()
	served := func() *x509.Certificate {
		t.Helper()
		client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: rootPEM},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, fmt.Sprintf("127.0.0.1:%d", httpsPort))
			},
		}}
		var err error
		for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			var resp *http.Response
			if resp, err = client.Get(fmt.Sprintf("https://broker.test:%d/", httpsPort)); err == nil {
				resp.Body.Close()
				return resp.TLS.PeerCertificates[0]
			}
		}
		t.Fatalf("no certificate issued by Pebble: %v", err)
		return nil
	}
	b := start()
	first := served()
	if len(first.DNSNames) != 1 || first.DNSNames[0] != "broker.test" {
		t.Errorf("certificate names %v", first.DNSNames)
	}
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(fmt.Sprintf("http://localhost:%d/get_user", httpPort))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	// To --domain, whatever Host the client sent (no open redirect).
	if want := fmt.Sprintf("https://broker.test:%d/get_user", httpsPort); resp.StatusCode != 301 || resp.Header.Get("Location") != want {
		t.Errorf("plain HTTP: got %d %q; want a redirect to %s", resp.StatusCode, resp.Header.Get("Location"), want)
	}
	stop(b)
	b = start()
	defer stop(b)
	if again := served(); again.SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Error("a restart obtained a new certificate instead of reusing the cached one")
	}
}
