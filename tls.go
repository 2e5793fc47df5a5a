package main

import (
	"cmp"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// certFiles serves the pair --cert_path and --key_path, read again at each handshake and
// taken into use when either file's content changed, so renewed files apply at once. A
// new pair that fails to load (mismatched, expired, half written) is logged and the last
// good one kept.
type certFiles struct {
	certPath, keyPath string
	log               *slog.Logger
	mu                sync.Mutex // guards the fields below: one handshake at a time reads the files
	cert              *tls.Certificate
	seen              string // the content of the files last read
}

// load takes the pair into use if the files changed since they were last read. The
// caller holds c.mu, or is alone with c.
func (c *certFiles) load(now time.Time) error {
	certPEM, err := os.ReadFile(c.certPath)
	keyPEM, err2 := os.ReadFile(c.keyPath)
	if seen := string(certPEM) + string(keyPEM); seen != c.seen || c.cert == nil {
		c.seen = seen
		cert, err3 := tls.X509KeyPair(certPEM, keyPEM) // parses the leaf too (Go 1.23); a read error comes first
		if err = cmp.Or(err, err2, err3); err == nil && (now.After(cert.Leaf.NotAfter) || now.Before(cert.Leaf.NotBefore)) {
			err = fmt.Errorf("valid only from %s to %s", cert.Leaf.NotBefore.Format(time.RFC3339), cert.Leaf.NotAfter.Format(time.RFC3339))
		}
		if err != nil {
			return fmt.Errorf("tls: certificate %s with key %s: %w", c.certPath, c.keyPath, err)
		}
		c.cert = &cert
	}
	return nil
}

func (c *certFiles) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.load(time.Now()); err != nil {
		c.log.Error("keeping the certificate in use", "err", err)
	}
	return c.cert, nil
}

// serveTLS serves srv over HTTPS on --https_port (HTTP/2 or HTTP/1.1, TLS 1.2 at least)
// and, on --http_port, the ACME HTTP-01 challenge and a redirect of everything else.
func (s *server) serveTLS(srv *http.Server, errc chan<- error) error {
	httpsPort := s.cfg.httpsPort // the port listened on, once known (--https_port 0 lets the kernel choose)
	var plain http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// To --domain when it is set: never to a name the client chose.
		host := net.JoinHostPort(cmp.Or(s.cfg.domain, (&url.URL{Host: r.Host}).Hostname()), strconv.Itoa(httpsPort))
		host = strings.TrimSuffix(host, ":443") // the default port goes unsaid; an IPv6 address keeps its brackets
		http.Redirect(w, r, (&url.URL{Scheme: "https", Host: host, Path: r.URL.Path, RawQuery: r.URL.RawQuery}).String(), http.StatusMovedPermanently)
	})
	if s.cfg.autoCert {
		m := &autocert.Manager{
			Prompt:     autocert.AcceptTOS,
			Cache:      autocert.DirCache(s.cfg.certs),       // restarts reuse the certificate
			HostPolicy: autocert.HostWhitelist(s.cfg.domain), // never ask the CA for other names
			Client:     &acme.Client{DirectoryURL: s.cfg.acmeDirectory},
		}
		srv.TLSConfig, plain = m.TLSConfig(), m.HTTPHandler(plain)
	} else {
		c := &certFiles{certPath: s.cfg.certPath, keyPath: s.cfg.keyPath, log: s.log}
		if err := c.load(time.Now()); err != nil { // missing, mismatched or expired: refused at start, not at the first handshake
			return err
		}
		srv.TLSConfig = &tls.Config{GetCertificate: c.get, NextProtos: []string{"h2", "http/1.1"}}
	}
	srv.TLSConfig.MinVersion = tls.VersionTLS12
	httpsLn, err := net.Listen("tcp", net.JoinHostPort(s.cfg.host, strconv.Itoa(s.cfg.httpsPort)))
	if err != nil {
		return err
	}
	httpsPort = httpsLn.Addr().(*net.TCPAddr).Port
	httpLn, err := net.Listen("tcp", net.JoinHostPort(s.cfg.host, strconv.Itoa(s.cfg.httpPort)))
	if err != nil {
		return errors.Join(err, httpsLn.Close())
	}
	plainSrv := &http.Server{Handler: plain, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second}
	srv.RegisterOnShutdown(func() { plainSrv.Close() })
	s.log.Info("broker listening", "https", httpsLn.Addr().String(), "http", httpLn.Addr().String(), "version", version)
	go func() { errc <- srv.ServeTLS(httpsLn, "", "") }()
	go func() { errc <- plainSrv.Serve(httpLn) }()
	return nil
}
