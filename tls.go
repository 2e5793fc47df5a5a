package main

import (
	"cmp"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// loadCert reads the certificate pair, failing at start when it is missing, unreadable,
// mismatched or not valid now (rather than at the first handshake).
func loadCert(certPath, keyPath string, now time.Time) (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(certPath, keyPath) // parses the leaf too (Go 1.23)
	if err == nil && (now.After(cert.Leaf.NotAfter) || now.Before(cert.Leaf.NotBefore)) {
		err = fmt.Errorf("valid only from %s to %s", cert.Leaf.NotBefore.Format(time.RFC3339), cert.Leaf.NotAfter.Format(time.RFC3339))
	}
	if err != nil {
		return nil, fmt.Errorf("tls: certificate %s with key %s: %w", certPath, keyPath, err)
	}
	return &cert, nil
}

// serveTLS serves srv over HTTPS on --https_port (HTTP/2 or HTTP/1.1, TLS 1.2 at least)
// and, on --http_port, the ACME HTTP-01 challenge and a redirect of everything else.
func (s *server) serveTLS(srv *http.Server, errc chan<- error) error {
	var plain http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// To --domain when it is set: never to a name the client chose.
		host := net.JoinHostPort(cmp.Or(s.cfg.domain, (&url.URL{Host: r.Host}).Hostname()), strconv.Itoa(s.cfg.httpsPort))
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
		cert, err := loadCert(s.cfg.certPath, s.cfg.keyPath, time.Now())
		if err != nil {
			return err
		}
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{"h2", "http/1.1"}}
	}
	srv.TLSConfig.MinVersion = tls.VersionTLS12
	httpsLn, err := net.Listen("tcp", net.JoinHostPort(s.cfg.host, strconv.Itoa(s.cfg.httpsPort)))
	if err != nil {
		return err
	}
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
