// Command broker is a real-time Backend-as-a-Service in one binary: accounts (JWT, HTTP
// Basic, two-factor TOTP, password reset), multi-tenant insert-only events and a
// Server-Sent Events stream of them, with an admin console at /admin/.
package main

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/beevik/ntp"
)

// version is stamped by the release script (go build -ldflags "-X main.version=v1.2.3");
// otherwise it is what the go command recorded: the module version of go install
// ...@v1.2.3, or the one it derives from the checkout's tag and commit.
var version string

func init() {
	if bi, ok := debug.ReadBuildInfo(); ok && version == "" {
		version = bi.Main.Version // "(devel)" when the go command knows no better
	}
}

// config holds every setting. Each comes from a flag or, when the flag is not given, from
// the environment variable BROKER_<NAME> (e.g. BROKER_JWT_SECRET), so secrets need not
// show in ps. An empty variable sets the flag empty (BROKER_NTP_SERVER= turns NTP off).
type config struct {
	port, httpPort, httpsPort, maxStreams, maxUserStreams int
	jwtExpiry, totpDuration                               int64
	origin, jwtSecret, adminToken, domain, certs, host    string
	keyPath, certPath, acmeDirectory, db, ntpServer       string
	secure, autoCert, passwordChecker, showVersion        bool
	heartbeat                                             time.Duration
	cluster                                               clusterConfig // -tags cluster only
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.LookupEnv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "broker:", err)
		os.Exit(1)
	}
}

// parseConfig reads the settings. Help and errors show the built-in defaults, never the
// values of the environment (secrets).
func parseConfig(args []string, env func(string) (string, bool), stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("broker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.host, "host", "", "address to listen on (default every interface; loopback only while the default secrets are in use)")
	fs.IntVar(&c.port, "port", 8080, "HTTP port when not --secure")
	fs.StringVar(&c.origin, "origin", "*", "allowed CORS origin")
	fs.Int64Var(&c.jwtExpiry, "jwt_expiry", 86400, "JWT lifetime, seconds")
	fs.StringVar(&c.jwtSecret, "jwt_secret", "secret", "HS256 key of the JWTs")
	fs.StringVar(&c.adminToken, "admin_token", "letmein", "token of the admin endpoints")
	fs.BoolVar(&c.secure, "secure", false, "serve HTTPS on --https_port, and the ACME challenge and a redirect on --http_port")
	fs.BoolVar(&c.autoCert, "auto_cert", true, "with --secure: obtain and renew the certificate of --domain by ACME")
	fs.StringVar(&c.domain, "domain", "", "domain name of the certificate")
	fs.StringVar(&c.certs, "certs", "certs", "folder where ACME certificates are cached")
	fs.StringVar(&c.keyPath, "key_path", "certs/private_key.pem", "PEM key of your own certificate (--auto_cert=false)")
	fs.StringVar(&c.certPath, "cert_path", "certs/chain.pem", "PEM chain of your own certificate (--auto_cert=false)")
	fs.StringVar(&c.acmeDirectory, "acme_directory", "https://acme-v02.api.letsencrypt.org/directory", "ACME directory URL, e.g. Let's Encrypt staging")
	fs.IntVar(&c.httpPort, "http_port", 80, "with --secure: port of the ACME HTTP-01 challenge and of the redirect to HTTPS")
	fs.IntVar(&c.httpsPort, "https_port", 443, "with --secure: HTTPS port")
	fs.StringVar(&c.db, "db", "db", "folder of the embedded database")
	fs.BoolVar(&c.passwordChecker, "password_checker", false, "refuse weak passwords (zxcvbn score under 3)")
	fs.Int64Var(&c.totpDuration, "totp_duration", 300, "lifetime of password-reset codes, seconds")
	fs.StringVar(&c.ntpServer, "ntp_server", "pool.ntp.org", "NTP server of the clock for JWT expiry and TOTP; empty: the local clock")
	fs.IntVar(&c.maxStreams, "max_streams", 100000, "most event streams open at once (the file limit, ulimit -n, bounds it too)")
	fs.IntVar(&c.maxUserStreams, "max_user_streams", 1000, "most event streams open at once per user")
	fs.DurationVar(&c.heartbeat, "heartbeat", 30*time.Second, "silence after which a stream gets a keep-alive")
	fs.BoolVar(&c.showVersion, "version", false, "print the version and exit")
	c.cluster.flags(fs)
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		name := "BROKER_" + strings.ToUpper(f.Name)
		if v, ok := env(name); ok {
			if err := f.Value.Set(v); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", name, err))
			}
		}
	})
	err := errors.Join(append(errs, fs.Parse(args))...)
	switch {
	case err != nil:
		return c, err
	case fs.NArg() > 0: // flag parsing stopped there: what follows would be ignored
		return c, errors.New("unexpected argument on the command line: every setting is a --flag")
	case c.jwtSecret == "" || c.adminToken == "":
		return c, errors.New("--jwt_secret and --admin_token must not be empty")
	case c.secure && (len(c.jwtSecret) < 32 || len(c.adminToken) < 16):
		return c, errors.New("--secure needs your own --jwt_secret of at least 32 bytes and --admin_token of at least 16 (the defaults are public)")
	case c.secure && c.autoCert && c.domain == "":
		return c, errors.New("--secure with --auto_cert needs --domain")
	case c.jwtExpiry <= 0 || c.totpDuration <= 0 || c.maxStreams <= 0 || c.maxUserStreams <= 0 || c.heartbeat <= 0:
		return c, errors.New("--jwt_expiry, --totp_duration, --max_streams, --max_user_streams and --heartbeat must be positive")
	}
	return c, nil
}

// server is broker: its settings, database, hub and what is derived from the settings.
type server struct {
	cfg       config
	db        *store
	hub       *hub
	log       *slog.Logger
	now       func() time.Time // the NTP-corrected clock; tests set their own
	adminHash [32]byte
	rootKey   ed25519.PrivateKey
	dummyHash string // hashed for unknown users, so they cost as much as known ones
	throttle  *throttle
	mu        sync.Mutex               // guards shares
	shares    map[[2]any]chan struct{} // users' shares of the turns below, by [user, turns]
	// Turns to compute an argon2 hash (19 MiB each), to read request bodies, and to write
	// a page of a stream's backlog.
	hashSlots, smallBodies, largeBodies, publicBodies, backlogTurns chan struct{}
}

// userTurns returns user's share of the turns of pool, n of them, made on first use: an
// entry per user and pool at most.
func (s *server) userTurns(user string, pool chan struct{}, n int) chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shares[[2]any{user, pool}] == nil {
		s.shares[[2]any{user, pool}] = make(chan struct{}, n)
	}
	return s.shares[[2]any{user, pool}]
}

// newServer opens the database in cfg.db and builds the server around it.
func newServer(cfg config, log *slog.Logger, now func() time.Time) (_ *server, err error) {
	defer func() { // bbolt panics on some corrupt pages
		if v := recover(); v != nil {
			err = fmt.Errorf("store: the database in %s is corrupt (%v): restore a backup", cfg.db, v)
		}
	}()
	db, err := openStore(cfg.db)
	if err != nil {
		return nil, err
	}
	s := &server{
		cfg: cfg, db: db, log: log, now: now,
		adminHash: sha256.Sum256([]byte(cfg.adminToken)), hashSlots: make(chan struct{}, 4),
		throttle:    &throttle{maxKeys: throttleKeys, strikes: map[tkey]strike{}},
		smallBodies: make(chan struct{}, smallBodies), largeBodies: make(chan struct{}, largeBodies), publicBodies: make(chan struct{}, publicBodies),
		backlogTurns: make(chan struct{}, backlogTurns), shares: map[[2]any]chan struct{}{},
	}
	s.hub, err = newHub(db, log, cfg)
	if err == nil {
		s.rootKey, err = db.rootKey()
	}
	if err == nil {
		s.dummyHash, err = s.hashPassword(context.Background(), newID())
	}
	if err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// close ends every stream, stops the hub and closes the database.
func (s *server) close() error {
	s.hub.closeStreams()
	s.hub.close()
	return s.db.close()
}

func run(ctx context.Context, args []string, env func(string) (string, bool), stdout, stderr io.Writer) error {
	cfg, err := parseConfig(args, env, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	} else if err != nil {
		return err
	} else if cfg.showVersion {
		fmt.Fprintln(stdout, "broker", version)
		return nil
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	if cfg.jwtSecret == "secret" || cfg.adminToken == "letmein" {
		// Any web page its user visits could drive a reachable instance with public secrets.
		cfg.host = "127.0.0.1"
		log.Warn("the default --jwt_secret or --admin_token is in use: anyone could forge tokens or manage users, so broker listens on loopback only; set your own to listen on --host")
	}
	var offset atomic.Int64 // of the NTP clock, nanoseconds
	if cfg.ntpServer != "" {
		go syncClock(ctx, cfg.ntpServer, &offset, log)
	}
	s, err := newServer(cfg, log, func() time.Time { return time.Now().Add(time.Duration(offset.Load())) })
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: 10 * time.Second, // slowloris
		ReadTimeout:       30 * time.Second, // request bodies are at most 1 MiB
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10, // a JWT is at most 8 KiB
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		// No WriteTimeout: it would cut event streams, which set a deadline per write.
	}
	errc := make(chan error, 2)
	var ln net.Listener
	if cfg.secure {
		err = s.serveTLS(srv, errc)
	} else if ln, err = net.Listen("tcp", net.JoinHostPort(cfg.host, strconv.Itoa(cfg.port))); err == nil {
		log.Info("broker listening", "addr", ln.Addr().String(), "version", version)
		go func() { errc <- srv.Serve(ln) }()
	}
	if err == nil {
		select {
		case <-ctx.Done():
		case err = <-errc:
		}
	}
	log.Info("shutting down")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.hub.closeStreams()
	srv.Shutdown(ctx)
	return errors.Join(err, s.close())
}

// maxClockOffset bounds the NTP offset broker applies: a larger one is more likely a
// spoofed or broken answer than a clock that far off, and would expire every token.
const maxClockOffset = 5 * time.Minute

// syncClock measures the offset to the NTP server now and every hour. Without a plausible
// answer the last good offset stays in use (at first none: the local clock).
func syncClock(ctx context.Context, server string, offset *atomic.Int64, log *slog.Logger) {
	for ctx.Err() == nil {
		resp, err := ntp.QueryWithOptions(server, ntp.QueryOptions{Timeout: 5 * time.Second})
		if err == nil {
			if err = resp.Validate(); err == nil && resp.ClockOffset.Abs() > maxClockOffset {
				err = fmt.Errorf("offset %s is over %s: refused", resp.ClockOffset, maxClockOffset)
			}
		}
		if err != nil {
			log.Warn("no usable ntp answer, keeping the current clock", "server", server, "err", err)
		} else {
			offset.Store(int64(resp.ClockOffset))
			log.Info("ntp clock offset", "server", server, "offset", resp.ClockOffset)
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Hour):
		}
	}
}
