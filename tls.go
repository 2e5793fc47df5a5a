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

// certFiles serves the certificate in --cert_path/--key_path and reloads it when the files
// change (checked at most once a minute), so a renewed certificate needs no restart.
type certFiles struct {
	certPath, keyPath string
	now               func() time.Time

	mu      sync.Mutex // guards the fields below
	cert    *tls.Certificate
	modTime time.Time // of the newer of the two files when cert was loaded
	checked time.Time
}

// loadCertFiles loads the pair and fails at once when it is missing, unreadable,
// mismatched or outside its validity period.
func loadCertFiles(certPath, keyPath string, now func() time.Time) (*certFiles, error) {
	cf := &certFiles{certPath: certPath, keyPath: keyPath, now: now}
	if err := cf.load(); err != nil {
		return nil, err
	}
	return cf, nil
}

func (cf *certFiles) load() error {
	mod := time.Time{}
	for _, p := range []string{cf.certPath, cf.keyPath} {
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("tls: certificate: %w", err)
		}
		if fi.ModTime().After(mod) {
			mod = fi.ModTime()
		}
	}
	cert, err := tls.LoadX509KeyPair(cf.certPath, cf.keyPath)
	if err != nil {
		return fmt.Errorf("tls: certificate %s with key %s: %w", cf.certPath, cf.keyPath, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return fmt.Errorf("tls: certificate %s: %w", cf.certPath, err)
	}
	if now := cf.now(); now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
		return fmt.Errorf("tls: certificate %s is valid only from %s to %s", cf.certPath, leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339))
	}
	cert.Leaf = leaf
	cf.mu.Lock()
	cf.cert, cf.modTime = &cert, mod
	cf.mu.Unlock()
	return nil
}

// getCertificate is tls.Config.GetCertificate. A renewed pair that fails to load is
// logged by the caller's next start; the certificate in use stays.
func (cf *certFiles) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	cf.mu.Lock()
	stale := cf.now().Sub(cf.checked) > time.Minute
	if stale {
		cf.checked = cf.now()
	}
	cert, mod := cf.cert, cf.modTime
	cf.mu.Unlock()
	if stale {
		fc, err1 := os.Stat(cf.certPath)
		fk, err2 := os.Stat(cf.keyPath)
		if err1 == nil && err2 == nil && (fc.ModTime().After(mod) || fk.ModTime().After(mod)) && cf.load() == nil {
			cf.mu.Lock()
			cert = cf.cert
			cf.mu.Unlock()
		}
	}
	return cert, nil
}

// serveTLS serves srv over HTTPS on --https_port (HTTP/2 and HTTP/1.1, TLS 1.2 or later)
// and, on --http_port, the ACME HTTP-01 challenge and a redirect of everything else.
func (s *server) serveTLS(srv *http.Server, errc chan<- error) error {
	redirect := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := s.cfg.domain
		if host == "" {
			host, _, _ = net.SplitHostPort(r.Host)
		}
		if s.cfg.httpsPort != 443 {
			host = net.JoinHostPort(host, strconv.Itoa(s.cfg.httpsPort))
		}
		http.Redirect(w, r, "https://"+host+r.URL.RequestURI(), http.StatusMovedPermanently)
	})
	var plain http.Handler = redirect
	if s.cfg.autoCert {
		m := &autocert.Manager{
			Prompt:     autocert.AcceptTOS,
			Cache:      autocert.DirCache(s.cfg.certs),
			HostPolicy: autocert.HostWhitelist(s.cfg.domain), // never ask the CA for other names
			Client:     &acme.Client{DirectoryURL: s.cfg.acmeDirectory},
		}
		srv.TLSConfig = m.TLSConfig()
		plain = m.HTTPHandler(redirect)
	} else {
		cf, err := loadCertFiles(s.cfg.certPath, s.cfg.keyPath, time.Now)
		if err != nil {
			return err
		}
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
	s.log.Info("broker listening", "https", httpsLn.Addr().String(), "http", httpLn.Addr().String(), "version", version)
	go func() { errc <- srv.ServeTLS(httpsLn, "", "") }()
	go func() { errc <- plainSrv.Serve(httpLn) }()
	return nil
}
