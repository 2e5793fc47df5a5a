package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// certFiles serves the certificate in --cert_path and --key_path, and reloads it when the
// files change (looked at once a minute at most), so a renewed certificate needs no restart.
type certFiles struct {
	certPath, keyPath string
	mu                sync.Mutex // guards the fields below
	cert              *tls.Certificate
	loaded, checked   time.Time // modification time of the files loaded; last look
}

// load reads the pair, failing when it is missing, unreadable, mismatched or not valid now.
func (cf *certFiles) load(now time.Time) (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(cf.certPath, cf.keyPath)
	if err != nil {
		return nil, fmt.Errorf("tls: certificate %s with key %s: %w", cf.certPath, cf.keyPath, err)
	}
	if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err == nil && (now.After(cert.Leaf.NotAfter) || now.Before(cert.Leaf.NotBefore)) {
		err = fmt.Errorf("valid only from %s to %s", cert.Leaf.NotBefore.Format(time.RFC3339), cert.Leaf.NotAfter.Format(time.RFC3339))
	}
	if err != nil {
		return nil, fmt.Errorf("tls: certificate %s: %w", cf.certPath, err)
	}
	return &cert, nil
}

// modTime is the later modification time of the two files.
func (cf *certFiles) modTime() time.Time {
	var t time.Time
	for _, p := range []string{cf.certPath, cf.keyPath} {
		if fi, err := os.Stat(p); err == nil && fi.ModTime().After(t) {
			t = fi.ModTime()
		}
	}
	return t
}

// getCertificate is tls.Config.GetCertificate. A renewed pair that does not load keeps the
// certificate in use.
func (cf *certFiles) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	cf.mu.Lock()
	defer cf.mu.Unlock()
	if now := time.Now(); now.Sub(cf.checked) > time.Minute {
		cf.checked = now
		if mod := cf.modTime(); mod.After(cf.loaded) {
			if cert, err := cf.load(now); err == nil {
				cf.cert, cf.loaded = cert, mod
			}
		}
	}
	return cf.cert, nil
}

// serveTLS serves srv over HTTPS on --https_port (HTTP/2 or HTTP/1.1, TLS 1.2 at least)
// and, on --http_port, the ACME HTTP-01 challenge and a redirect of everything else.
func (s *server) serveTLS(srv *http.Server, errc chan<- error) error {
	var plain http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			host = r.Host
		}
		if s.cfg.httpsPort != 443 {
			host = net.JoinHostPort(host, strconv.Itoa(s.cfg.httpsPort))
		}
		http.Redirect(w, r, "https://"+host+r.URL.RequestURI(), http.StatusMovedPermanently)
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
		cf := &certFiles{certPath: s.cfg.certPath, keyPath: s.cfg.keyPath, checked: time.Now()}
		cf.loaded = cf.modTime()
		cert, err := cf.load(time.Now())
		if err != nil {
			return err
		}
		cf.cert = cert
		srv.TLSConfig = &tls.Config{GetCertificate: cf.getCertificate, NextProtos: []string{"h2", "http/1.1"}}
	}
	srv.TLSConfig.MinVersion = tls.VersionTLS12
	httpsLn, err := net.Listen("tcp", fmt.Sprintf(":%d", s.cfg.httpsPort))
	if err != nil {
		return err
	}
	httpLn, err := net.Listen("tcp", fmt.Sprintf(":%d", s.cfg.httpPort))
	if err != nil {
		httpsLn.Close()
		return err
	}
	plainSrv := &http.Server{Handler: plain, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second}
	srv.RegisterOnShutdown(func() { plainSrv.Close() })
	s.log.Info("broker listening", "https", httpsLn.Addr().String(), "http", httpLn.Addr().String(), "version", version())
	go func() { errc <- srv.ServeTLS(httpsLn, "", "") }()
	go func() { errc <- plainSrv.Serve(httpLn) }()
	return nil
}
