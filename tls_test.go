package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

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

// startTimeout bounds the wait for a starting broker to say where it listens.
const startTimeout = 30 * time.Second

// listeningMsg marks the line the broker logs once it listens: `msg="broker listening"
// addr=HOST:PORT`, or with --secure `https=HOST:PORT http=HOST:PORT` (main.go, tls.go).
const listeningMsg = `msg="broker listening"`

// listenWatch passes a log on to w and sends, once, the line with listeningMsg on line.
type listenWatch struct {
	w    io.Writer
	line chan string
	mu   sync.Mutex
	rest []byte // an unfinished line
	seen bool
}

func newListenWatch(w io.Writer) *listenWatch {
	return &listenWatch{w: w, line: make(chan string, 1)}
}

func (l *listenWatch) Write(p []byte) (int, error) {
	l.mu.Lock()
	if !l.seen {
		l.rest = append(l.rest, p...)
		for i := bytes.IndexByte(l.rest, '\n'); i >= 0 && !l.seen; i = bytes.IndexByte(l.rest, '\n') {
			if line := string(l.rest[:i]); strings.Contains(line, listeningMsg) {
				l.seen = true
				l.line <- line
			}
			l.rest = l.rest[i+1:]
		}
		if l.seen {
			l.rest = nil
		}
	}
	l.mu.Unlock()
	return l.w.Write(p)
}

// listenAddrs are the addresses of a "broker listening" line: addr without --secure,
// https and http with it.
type listenAddrs struct {
	line              string
	addr, https, http string
}

func parseListening(line string) listenAddrs {
	a := listenAddrs{line: line}
	for _, f := range strings.Fields(line) {
		switch k, v, _ := strings.Cut(f, "="); k {
		case "addr":
			a.addr = v
		case "https":
			a.https = v
		case "http":
			a.http = v
		}
	}
	return a
}

// portOf returns the port of a HOST:PORT address.
func portOf(addr string) string {
	_, port, _ := net.SplitHostPort(addr)
	return port
}

// runningBroker is a broker that run serves in-process (startBroker).
type runningBroker struct {
	listenAddrs
	log    *syncBuffer // everything it logged
	cancel context.CancelFunc
	done   chan struct{} // closed once run returned, with its result in err
	err    error
}

// stop cancels run and returns its result; the test fails if run does not return in 20 s.
func (b *runningBroker) stop(t *testing.T) error {
	t.Helper()
	b.cancel()
	select {
	case <-b.done:
		return b.err
	case <-time.After(20 * time.Second):
		t.Error("broker did not stop within 20 s")
		return errors.New("broker did not stop within 20 s")
	}
}

// tryStartBroker runs the broker in-process with args (after --ntp_server= and a new --db,
// which args may override) and returns as soon as it logs where it listens. It returns
// an error wrapping run's, with the log, if run returns before that, and an error if that
// takes over startTimeout. The test's cleanup stops the broker.
func tryStartBroker(t *testing.T, args ...string) (*runningBroker, error) {
	t.Helper()
	args = append([]string{"--ntp_server=", "--db", t.TempDir()}, args...)
	ctx, cancel := context.WithCancel(context.Background())
	b := &runningBroker{log: &syncBuffer{}, cancel: cancel, done: make(chan struct{})}
	watch := newListenWatch(b.log)
	go func() {
		defer close(b.done)
		b.err = run(ctx, args, noEnv, io.Discard, watch)
	}()
	t.Cleanup(func() { b.stop(t) })
	select {
	case line := <-watch.line:
		b.listenAddrs = parseListening(line)
		return b, nil
	case <-b.done:
		return nil, fmt.Errorf("broker %q ended before listening: %w\nits log:\n%s", args, cmp.Or(b.err, errors.New("no error")), b.log)
	case <-time.After(startTimeout):
		return nil, fmt.Errorf("broker %q: no %s in its log within %s; its log:\n%s", args, listeningMsg, startTimeout, b.log)
	}
}

// startBroker is tryStartBroker failing the test at once when the broker does not start.
func startBroker(t *testing.T, args ...string) *runningBroker {
	t.Helper()
	b, err := tryStartBroker(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// startBrokerRetry is startBroker with the arguments args returns, started again while it
// fails because a port it was given is in use (retryInUse): the restart of a broker on
// the port its clients know, or a port the test chose itself (unusedPorts), args then
// choosing another one each time.
func startBrokerRetry(t *testing.T, args func() []string) *runningBroker {
	t.Helper()
	var b *runningBroker
	retryInUse(t, func() (err error) {
		b, err = tryStartBroker(t, args()...)
		return err
	})
	return b
}

// retryInUse calls start until it succeeds, failing the test at once when start fails
// otherwise than with EADDRINUSE, and after 20 tries 250 ms apart (a port held briefly
// elsewhere: an outgoing connection's, another test's).
func retryInUse(t *testing.T, start func() error) {
	t.Helper()
	for try := 1; ; try++ {
		err := start()
		if err == nil {
			return
		} else if !errors.Is(err, syscall.EADDRINUSE) || try == 20 {
			t.Fatalf("start (try %d): %v", try, err)
		}
		t.Logf("a port is in use, starting again (try %d): %s", try, strings.SplitN(err.Error(), "\n", 2)[0])
		time.Sleep(250 * time.Millisecond)
	}
}

// unusedPorts returns n ports the kernel found free on every interface a moment ago, for
// a program that must be told its port before it starts and cannot take port 0: Pebble,
// which does not say which port it got. Another process may take them meanwhile: start the program
// with retryInUse, choosing new ports on each try.
func unusedPorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	for range n { // all open at once, so they differ
		ln, err := net.Listen("tcp", ":0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// brokerProc is the broker binary running as a process (startBin).
type brokerProc struct {
	listenAddrs
	cmd    *exec.Cmd
	log    *syncBuffer   // its standard error
	exited chan struct{} // closed once it exited
}

// tryStartBin runs the broker binary bin with args and env (nil: the test's environment),
// its standard error copied to out (nil: nowhere) and log, and returns as soon as it logs
// where it listens. It returns an error with its log if it exits before that (wrapping
// EADDRINUSE if a port was in use), or if that takes over startTimeout. The test's
// cleanup kills it.
func tryStartBin(t *testing.T, bin string, env []string, out io.Writer, args ...string) (*brokerProc, error) {
	t.Helper()
	p := &brokerProc{cmd: exec.Command(bin, args...), log: &syncBuffer{}, exited: make(chan struct{})}
	var w io.Writer = p.log
	if out != nil {
		w = io.MultiWriter(p.log, out)
	}
	watch := newListenWatch(w)
	p.cmd.Env, p.cmd.Stderr = env, watch // exec copies its standard error to watch, line by line as written
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		defer close(p.exited)
		p.cmd.Wait()
	}()
	t.Cleanup(p.kill)
	select {
	case line := <-watch.line:
		p.listenAddrs = parseListening(line)
		return p, nil
	case <-p.exited:
		err := fmt.Errorf("broker %q exited before listening (%v); its log:\n%s", args, p.cmd.ProcessState, p.log)
		if strings.Contains(p.log.String(), syscall.EADDRINUSE.Error()) {
			err = fmt.Errorf("%w: %w", syscall.EADDRINUSE, err)
		}
		return nil, err
	case <-time.After(startTimeout):
		return nil, fmt.Errorf("broker %q: no %s in its log within %s; its log:\n%s", args, listeningMsg, startTimeout, p.log)
	}
}

// startBin is tryStartBin failing the test at once when the broker does not start.
func startBin(t *testing.T, bin string, env []string, out io.Writer, args ...string) *brokerProc {
	t.Helper()
	p, err := tryStartBin(t, bin, env, out, args...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// kill kills the process (SIGKILL) and waits until it exited.
func (p *brokerProc) kill() {
	p.cmd.Process.Kill()
	<-p.exited
}

// stop asks the process to stop (SIGTERM) and waits until it exited, killing it and
// failing the test after 20 s.
func (p *brokerProc) stop(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(20 * time.Second):
		t.Errorf("broker did not stop within 20 s of SIGTERM; its log:\n%s", p.log)
		p.kill()
	}
}

// waitUp polls url until it answers, for a server that does not say when it listens
// (Pebble). It returns an error at once when exited (the server's end) yields, and when
// url has not answered within 30 s.
func waitUp(client *http.Client, url string, exited <-chan struct{}) error {
	deadline := time.After(30 * time.Second)
	for {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%s: the server exited", url)
		case <-deadline:
			return fmt.Errorf("%s not up within 30 s: %v", url, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// startSecure starts the broker with --secure and the pair certPath, keyPath, on HTTPS and
// plain-HTTP ports chosen by the kernel.
func startSecure(t *testing.T, certPath, keyPath string, args ...string) *runningBroker {
	t.Helper()
	return startBroker(t, append([]string{"--secure", "--auto_cert=false", "--jwt_secret=0123456789abcdef0123456789abcdef", "--admin_token=admin-0123456789",
		"--cert_path", certPath, "--key_path", keyPath, "--https_port", "0", "--http_port", "0"}, args...)...)
}

func TestOwnCertificate(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath := writeCert(t, dir, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
	b := startSecure(t, certPath, keyPath)
	httpsPort, httpPort := portOf(b.https), portOf(b.http)
	pool := x509.NewCertPool()
	pem, _ := os.ReadFile(certPath)
	pool.AppendCertsFromPEM(pem)
	base := "https://localhost:" + httpsPort
	for _, h2 := range []bool{true, false} {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: h2}
		if !h2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		client := &http.Client{Transport: tr}
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
	resp, err := noFollow.Get("http://localhost:" + httpPort + "/list_users?x=1")
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
		ctx, cancel := context.WithTimeout(context.Background(), startTimeout) // ends run if it starts after all
		err := run(ctx, []string{"--ntp_server=", "--db", t.TempDir(), "--secure", "--auto_cert=false", "--jwt_secret=0123456789abcdef0123456789abcdef", "--admin_token=admin-0123456789",
			"--cert_path", c.cert, "--key_path", c.key, "--https_port", "0", "--http_port", "0"}, noEnv, io.Discard, io.Discard)
		cancel()
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
	pebbleCA := filepath.Join(pebbleDir, "test/certs/pebble.minica.pem")
	caPool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(pebbleCA)
	caPool.AppendCertsFromPEM(caPEM)
	toPebble := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: caPool}}}
	// Pebble listens where its configuration says and does not say which port 0 gave: its
	// ports are chosen here, and again while one is found in use.
	var acmePort, mgmtPort int
	retryInUse(t, func() error {
		ports := unusedPorts(t, 2)
		acmePort, mgmtPort = ports[0], ports[1]
		cfg := filepath.Join(t.TempDir(), "pebble.json")
		// httpPort and tlsPort are where Pebble would validate challenges, which
		// PEBBLE_VA_ALWAYS_VALID skips: nothing connects to them.
		os.WriteFile(cfg, []byte(fmt.Sprintf(`{"pebble": {"listenAddress": "127.0.0.1:%d", "managementListenAddress": "127.0.0.1:%d",
		"certificate": "test/certs/localhost/cert.pem", "privateKey": "test/certs/localhost/key.pem",
		"httpPort": 5002, "tlsPort": 5001, "ocspResponderURL": "", "externalAccountBindingRequired": false}}`, acmePort, mgmtPort)), 0o600)
		pebble := exec.Command(filepath.Join(gobin, "pebble"), "-config", cfg)
		pebble.Dir = pebbleDir
		pebble.Env = append(os.Environ(), "PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0", "PEBBLE_VA_ALWAYS_VALID=1")
		out := &syncBuffer{}
		pebble.Stdout, pebble.Stderr = out, out
		if err := pebble.Start(); err != nil {
			return err
		}
		exited := make(chan struct{})
		go func() {
			defer close(exited)
			pebble.Wait()
		}()
		t.Cleanup(func() { pebble.Process.Kill(); <-exited })
		err := waitUp(toPebble, fmt.Sprintf("https://localhost:%d/dir", acmePort), exited)
		if err == nil {
			err = waitUp(toPebble, fmt.Sprintf("https://localhost:%d/roots/0", mgmtPort), exited)
		}
		if err != nil && strings.Contains(out.String(), syscall.EADDRINUSE.Error()) {
			err = fmt.Errorf("%w: %w", syscall.EADDRINUSE, err)
		}
		if err != nil {
			return fmt.Errorf("pebble: %w\n%s", err, out)
		}
		return nil
	})

	bin, dir := buildBroker(t), t.TempDir()
	start := func(httpsPort string) (*brokerProc, error) {
		return tryStartBin(t, bin, append(os.Environ(), "SSL_CERT_FILE="+pebbleCA), os.Stderr, // trust Pebble's directory
			"--secure", "--domain", "broker.test", "--acme_directory", fmt.Sprintf("https://localhost:%d/dir", acmePort),
			"--certs", filepath.Join(dir, "certs"), "--db", filepath.Join(dir, "db"), "--http_port", "0",
			"--https_port", httpsPort, "--jwt_secret", "0123456789abcdef0123456789abcdef", "--admin_token", "admin-0123456789", "--ntp_server=")
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
	served := func(b *brokerProc) *x509.Certificate {
		t.Helper()
		client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: rootPEM},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, network, "127.0.0.1:"+portOf(b.https))
			},
		}}
		var err error
		for deadline := time.After(90 * time.Second); ; {
			var resp *http.Response
			if resp, err = client.Get("https://broker.test:" + portOf(b.https) + "/"); err == nil {
				resp.Body.Close()
				return resp.TLS.PeerCertificates[0]
			}
			select {
			case <-b.exited:
				t.Fatalf("broker exited (%v) before serving a certificate: %v", b.cmd.ProcessState, err)
			case <-deadline:
				t.Fatalf("no certificate issued by Pebble: %v", err)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	// The redirect from plain HTTP names --https_port: this port is chosen here.
	var b *brokerProc
	retryInUse(t, func() (err error) {
		b, err = start(fmt.Sprint(unusedPorts(t, 1)[0]))
		return err
	})
	httpsPort, httpPort := portOf(b.https), portOf(b.http)
	first := served(b)
	if len(first.DNSNames) != 1 || first.DNSNames[0] != "broker.test" {
		t.Errorf("certificate names %v", first.DNSNames)
	}
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get("http://localhost:" + httpPort + "/get_user")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	// To --domain, whatever Host the client sent (no open redirect).
	if want := "https://broker.test:" + httpsPort + "/get_user"; resp.StatusCode != 301 || resp.Header.Get("Location") != want {
		t.Errorf("plain HTTP: got %d %q; want a redirect to %s", resp.StatusCode, resp.Header.Get("Location"), want)
	}
	b.stop(t)
	b, err = start("0") // where the kernel chooses: the redirect is not checked again
	if err != nil {
		t.Fatal(err)
	}
	defer b.stop(t)
	if again := served(b); again.SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Error("a restart obtained a new certificate instead of reusing the cached one")
	}
}
