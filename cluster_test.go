//go:build cluster

package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// startNATS starts a JetStream cluster of n servers on loopback and returns them and their
// client URLs, comma-separated, once JetStream takes streams.
func startNATS(t testing.TB, n int) ([]*natsserver.Server, string) {
	t.Helper()
	var lns []net.Listener
	var routes, urls []string
	for range n { // free ports for the routes between the servers
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		routes = append(routes, "nats://"+ln.Addr().String())
	}
	for _, ln := range lns {
		ln.Close()
	}
	var servers []*natsserver.Server
	for i := range n {
		s, err := natsserver.NewServer(&natsserver.Options{
			ServerName: fmt.Sprint("n", i), Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
			JetStream: true, StoreDir: t.TempDir(),
			Cluster: natsserver.ClusterOpts{Name: "broker-test", Host: "127.0.0.1", Port: lns[i].Addr().(*net.TCPAddr).Port},
			Routes:  natsserver.RoutesFromStr(strings.Join(routes, ",")),
		})
		if err != nil {
			t.Fatal(err)
		}
		s.Start()
		t.Cleanup(s.Shutdown)
		servers = append(servers, s)
	}
	for _, s := range servers {
		if !s.ReadyForConnections(10 * time.Second) {
			t.Fatal("nats server not ready within 10 s")
		}
		urls = append(urls, s.ClientURL())
	}
	nc, err := nats.Connect(strings.Join(urls, ","))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) { // polling, bounded by the deadline
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := js.AccountInfo(ctx)
		cancel()
		if err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatal("jetstream cluster not ready within 30 s:", err)
		}
	}
	return servers, strings.Join(urls, ",")
}

// jetStream connects to the cluster at urls for the test's duration.
func jetStream(t *testing.T, urls string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(urls)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	return js
}

// clusterNode starts a broker on the cluster at urls, with its view in db (a new folder
// when empty).
func clusterNode(t *testing.T, urls, db string) *testBroker {
	t.Helper()
	return newTestBroker(t, func(c *config) {
		c.cluster = clusterConfig{nats: urls, stream: "broker", replicas: 3}
		if db != "" {
			c.db = db
		}
	})
}

// known waits until b's view holds user name (changes reach the other nodes in the time
// they take to apply the log).
func known(t *testing.T, b *testBroker, name string) {
	t.Helper()
	waitFor(t, 10*time.Second, "user "+name+" on another node", func() bool {
		code, _ := b.do("POST", "/get_user", obj{"admin_token": "letmein", "username": name})
		return code == 200
	})
}

func TestClusterSharesOneLog(t *testing.T) {
	_, urls := startNATS(t, 3)
	a, b, c := clusterNode(t, urls, ""), clusterNode(t, urls, ""), clusterNode(t, urls, "")

	// A user created on A logs in on B; every node has the same biscuit key.
	a.createUser("alice", "acme")
	known(t, b, "alice")
	jwt := b.login("alice")
	keyA := a.must(200, "GET", "/verify", nil, bearer(jwt)...)["key"]
	if keyB := b.must(200, "GET", "/verify", nil, bearer(jwt)...)["key"]; fmt.Sprint(keyA) != fmt.Sprint(keyB) {
		t.Errorf("biscuit keys differ: %v and %v", keyA, keyB)
	}

	// An insert on B reaches streams on A, B and C with the same ID.
	streams := []*stream{a.stream(bearer(jwt)...), b.stream(bearer(jwt)...), c.stream(bearer(jwt)...)}
	id := b.insert(jwt, "news", obj{"n": 1})
	for _, st := range streams {
		expect(t, st.next(), "news", fmt.Sprint(id), `{"n":1}`)
	}

	// Inserts on all three nodes: every stream sees them all in the same order.
	var ids []uint64
	for i, n := range []*testBroker{a, b, c, a, c, b} {
		ids = append(ids, n.insert(jwt, "news", obj{"n": i + 2}))
	}
	for _, st := range streams {
		for i, want := range ids {
			expect(t, st.next(), "news", fmt.Sprint(want), fmt.Sprintf(`{"n":%d}`, i+2))
		}
	}

	// A stream moved from A to C with Last-Event-ID misses nothing and repeats nothing.
	streams[0].resp.Body.Close()
	last := ids[len(ids)-1]
	more := []uint64{b.insert(jwt, "news", obj{"n": 100}), a.insert(jwt, "news", obj{"n": 101})}
	moved := c.stream(append(bearer(jwt), "Last-Event-ID", fmt.Sprint(last))...)
	for i, want := range more {
		expect(t, moved.next(), "news", fmt.Sprint(want), fmt.Sprintf(`{"n":%d}`, 100+i))
	}

	// A stream resuming on a node whose view lags behind its Last-Event-ID waits for it;
	// after 5 s it is answered 503, never with a backlog that would repeat events. An open
	// write transaction on C's database stands in for a slow disk.
	tx, err := c.s.db.db.Begin(true)
	if err != nil {
		t.Fatal(err)
	}
	ahead := fmt.Sprint(a.insert(jwt, "news", obj{"n": 102}))
	if code, out := c.do("GET", "/sse", nil, append(bearer(jwt), "Last-Event-ID", ahead)...); code != 503 {
		t.Errorf("resume on a node 5 s behind: got %d %s; want 503", code, out)
	}
	resumed := make(chan *stream)
	go func() { resumed <- c.stream(append(bearer(jwt), "Last-Event-ID", ahead)...) }()
	tx.Rollback()
	next := b.insert(jwt, "news", obj{"n": 103})
	expect(t, (<-resumed).next(), "news", fmt.Sprint(next), `{"n":103}`)

	// A revocation on C ends the user's streams on A and B.
	onA := a.stream(bearer(jwt)...)
	start := time.Now()
	c.must(200, "POST", "/revoke_user", obj{"admin_token": "letmein", "username": "alice"})
	onA.ended()
	streams[1].ended()
	t.Logf("a revocation on C ended the stream on A in %v", time.Since(start))
	waitFor(t, 10*time.Second, "revocation applied on A", func() bool {
		code, _ := a.do("GET", "/verify", nil, bearer(jwt)...)
		return code == 401
	})

	// Two nodes creating the same username at once: exactly one wins, on every node.
	for round := range 10 {
		name := fmt.Sprint("dup", round)
		codes := make([]int, 2)
		var wg sync.WaitGroup
		barrier := make(chan struct{})
		for i, n := range []*testBroker{a, b} {
			wg.Go(func() {
				<-barrier
				codes[i], _ = n.do("POST", "/create_user", obj{"username": name, "password": fmt.Sprint("pw-", i), "admin_token": "letmein", "tenant_name": fmt.Sprint("t", i)})
			})
		}
		close(barrier)
		wg.Wait()
		if slices.Sort(codes); codes[0] != 200 || codes[1] != 400 {
			t.Fatalf("round %d: two creates of one name answered %v; want one 200 and one 400", round, codes)
		}
		known(t, c, name)
		var tenants []any
		for _, n := range []*testBroker{a, b, c} {
			waitFor(t, 10*time.Second, "the user on every node", func() bool {
				code, _ := n.do("POST", "/get_user", obj{"admin_token": "letmein", "username": name})
				return code == 200
			})
			tenants = append(tenants, n.must(200, "POST", "/get_user", obj{"admin_token": "letmein", "username": name})["tenant_name"])
		}
		if tenants[0] != tenants[1] || tenants[1] != tenants[2] {
			t.Fatalf("round %d: the nodes disagree on the winner: tenants %v", round, tenants)
		}
	}
}

// history reads every event of jwt's tenant from b (a stream from ID 0) until it holds
// want events, and returns their IDs and data.
func history(t *testing.T, b *testBroker, jwt string, want int) map[uint64]string {
	t.Helper()
	st := b.stream(append(bearer(jwt), "Last-Event-ID", "0")...)
	defer st.resp.Body.Close()
	got := map[uint64]string{}
	for len(got) < want {
		ev := st.next()
		id, _ := strconv.ParseUint(ev.id, 10, 64)
		if _, dup := got[id]; dup {
			t.Fatalf("event %d twice", id)
		}
		got[id] = ev.data
	}
	return got
}

func TestClusterFaults(t *testing.T) {
	servers, urls := startNATS(t, 3)
	a, b := clusterNode(t, urls, ""), clusterNode(t, urls, "")
	t.Cleanup(func() {
		if t.Failed() {
			t.Log("A:", a.logs.String())
			t.Log("B:", b.logs.String())
		}
	})
	a.createUser("bob", "acme")
	known(t, b, "bob")
	jwt := a.login("bob")
	acked := map[uint64]string{} // every insert answered with an ID
	insert := func(n *testBroker, i int) {
		data := fmt.Sprintf(`{"i":%d}`, i)
		t0 := time.Now()
		id := n.insert(jwt, "e", obj{"i": i})
		if d := time.Since(t0); d > time.Second {
			t.Logf("insert %d took %v", i, d)
		}
		if _, dup := acked[id]; dup {
			t.Fatalf("ID %d given twice", id)
		}
		acked[id] = data
	}
	onA := a.stream(bearer(jwt)...)
	for i := range 10 {
		insert([]*testBroker{a, b}[i%2], i)
	}

	// The NATS server leading the log's stream goes: the log, with three replicas, stays
	// available once the other two have elected a leader.
	stream, err := jetStream(t, urls).Stream(context.Background(), "broker")
	if err != nil {
		t.Fatal(err)
	}
	leader := slices.IndexFunc(servers, func(s *natsserver.Server) bool { return s.Name() == stream.CachedInfo().Cluster.Leader })
	servers[leader].Shutdown()
	servers[leader].WaitForShutdown()
	for i := range 10 {
		insert([]*testBroker{a, b}[i%2], 10+i)
	}

	// Broker A goes: its client resumes on B from its last ID, with no loss.
	var seen []uint64
	for len(seen) < 20 {
		id, _ := strconv.ParseUint(onA.next().id, 10, 64)
		seen = append(seen, id)
	}
	a.stop()
	onA.ended()
	insert(b, 20)
	onB := b.stream(append(bearer(jwt), "Last-Event-ID", fmt.Sprint(seen[len(seen)-1]))...)
	if ev := onB.next(); ev.id != "21" || ev.data != `{"i":20}` {
		t.Fatalf("resumed on B with %q %q; want 21 {\"i\":20}", ev.id, ev.data)
	}

	// A node restarted with a wiped view rebuilds it from the log: the same IDs and data.
	c := clusterNode(t, urls, "")
	for i := range 5 {
		insert([]*testBroker{b, c}[i%2], 21+i)
	}
	sameHistory := func(nodes ...*testBroker) {
		t.Helper()
		for _, n := range nodes {
			got := history(t, n, jwt, len(acked))
			for id, data := range acked {
				if got[id] != data {
					t.Errorf("event %d is %q on a node; acknowledged as %q", id, got[id], data)
				}
			}
		}
	}
	sameHistory(b, c)
	// A restart on its own view goes on from where the view was.
	dir := c.s.cfg.db
	c.stop()
	insert(b, 26)
	c2 := clusterNode(t, urls, dir)
	insert(c2, 27)
	sameHistory(b, c2)

	// A node started from a peer's backup goes on from the log position the backup holds.
	_, snap := b.do("POST", "/backup", obj{"admin_token": "letmein"})
	seeded := t.TempDir()
	if err := os.WriteFile(filepath.Join(seeded, "broker.db"), snap, 0o600); err != nil {
		t.Fatal(err)
	}
	insert(b, 28)
	d := clusterNode(t, urls, seeded)
	insert(d, 29)
	sameHistory(b, d)
}

// openNode opens a broker on the log stream of the cluster at urls (none: alone), with its
// view in db, and returns the error that refused it.
func openNode(t *testing.T, urls, stream, db string, replicas int) error {
	t.Helper()
	cfg := testConfig(t)
	cfg.db, cfg.cluster = cmp.Or(db, cfg.db), clusterConfig{nats: urls, stream: stream, replicas: replicas}
	s, err := newServer(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Now)
	if err == nil {
		s.close()
	}
	return err
}

// TestClusterRefusesForeignViews: a view that differs from what its log says would give
// other IDs and users than the other nodes', so a node refuses to start on it.
func TestClusterRefusesForeignViews(t *testing.T) {
	_, urls := startNATS(t, 3)
	for _, users := range []int{0, 1} { // a default database started once has its own biscuit key
		solo := newTestBroker(t)
		for i := range users {
			solo.createUser(fmt.Sprint("carol", i), "acme")
		}
		solo.stop()
		if err := openNode(t, urls, "broker", solo.s.cfg.db, 3); !errors.Is(err, errLost) {
			t.Fatalf("a database made without the log, with %d users: got %v; want refused", users, err)
		}
	}

	// A view written without the log (by this build without --nats) is refused.
	a := clusterNode(t, urls, "")
	a.createUser("dave", "acme")
	dir := a.s.cfg.db
	a.stop()
	if err := openNode(t, urls, "broker", dir, 3); err != nil { // reopened as it is: fine, and again
		t.Fatal(err)
	}
	if err := openNode(t, "", "broker", dir, 3); err != nil { // alone, without the log, writing nothing: fine
		t.Fatal(err)
	}
	if err := openNode(t, urls, "broker", dir, 3); err != nil {
		t.Fatal(err)
	}
	alone := newTestBroker(t, func(c *config) { c.db = dir })
	alone.insert(alone.login("dave"), "e", 1)
	alone.stop()
	if err := openNode(t, urls, "broker", dir, 3); !errors.Is(err, errLost) {
		t.Fatalf("a view written without the log: got %v; want refused", err)
	}

	// A view of one stream is refused on another.
	b := clusterNode(t, urls, "")
	dir = b.s.cfg.db
	b.stop()
	if err := openNode(t, urls, "other", dir, 3); !errors.Is(err, errLost) {
		t.Fatalf("a view of another log: got %v; want refused", err)
	}

	// An existing stream keeps its replicas whatever a node's --nats_replicas says.
	if err := openNode(t, urls, "broker", "", 1); err != nil {
		t.Fatal(err)
	}
	js := jetStream(t, urls)
	stream, err := js.Stream(context.Background(), "broker")
	if err != nil || stream.CachedInfo().Config.Replicas != 3 {
		t.Fatalf("the log after a node with --nats_replicas 1: %v, %+v; want 3 replicas", err, stream)
	}
	// The log cannot be purged; a log whose beginning is gone (limits set by hand) is refused
	// to a new view.
	if err := stream.Purge(context.Background()); err == nil {
		t.Error("the log was purged")
	}
	if _, err := js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "trimmed", Subjects: []string{"trimmed"}, Replicas: 3, MaxMsgs: 2}); err != nil {
		t.Fatal(err)
	}
	c := newTestBroker(t, func(cfg *config) { cfg.cluster = clusterConfig{nats: urls, stream: "trimmed", replicas: 3} })
	for _, name := range []string{"e1", "e2", "e3"} {
		c.createUser(name, "acme")
	}
	if err := openNode(t, urls, "trimmed", "", 3); !errors.Is(err, errLost) {
		t.Fatalf("a new view of a log that lost its beginning: got %v; want refused", err)
	}
	// Nor one that lost a message in its middle (deletes allowed by hand).
	if _, err := js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "holed", Subjects: []string{"holed"}, Replicas: 3}); err != nil {
		t.Fatal(err)
	}
	d := newTestBroker(t, func(cfg *config) { cfg.cluster = clusterConfig{nats: urls, stream: "holed", replicas: 3} })
	for _, name := range []string{"h1", "h2", "h3"} {
		d.createUser(name, "acme")
	}
	holed, err := js.Stream(context.Background(), "holed")
	if err == nil {
		err = holed.DeleteMsg(context.Background(), 2)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := openNode(t, urls, "holed", "", 3); err == nil { // it stops at the hole, with errLost in its log
		t.Fatalf("a new view of a log with a hole: got %v; want refused", err)
	}
}

// TestClusterLogReplaced: a node whose log is deleted and made again stops following it and
// says so at GET /, rather than applying another log on top of its view.
func TestClusterLogReplaced(t *testing.T) {
	_, urls := startNATS(t, 3)
	a := clusterNode(t, urls, "")
	a.createUser("erin", "acme")
	js := jetStream(t, urls)
	if err := js.DeleteStream(context.Background(), "broker"); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "broker", Subjects: []string{"broker"}, Replicas: 3}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "GET / refused", func() bool {
		code, _ := a.do("GET", "/", nil)
		return code == 503
	})
	// A node that stopped following the log refuses writes, which it could not apply.
	if code, out := a.do("POST", "/create_user", obj{"admin_token": "letmein", "username": "gus", "password": "pw-gus", "tenant_name": "acme"}); code != 503 {
		t.Errorf("a write on a node that stopped following the log: got %d %s; want 503", code, out)
	}
	if stream, err := js.Stream(context.Background(), "broker"); err != nil || stream.CachedInfo().State.Msgs != 0 {
		t.Errorf("the new log holds %+v, %v; want nothing", stream, err)
	}
}

// TestClusterStartsTogether: nodes started at once on a new log all start, on one stream.
func TestClusterStartsTogether(t *testing.T) {
	_, urls := startNATS(t, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	barrier := make(chan struct{})
	for i := range errs {
		wg.Go(func() {
			<-barrier
			errs[i] = openNode(t, urls, "broker", "", 3)
		})
	}
	close(barrier)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
}

// TestClusterSkipsMalformedMessages: a message broker would never write is skipped alike by
// every node, which goes on.
func TestClusterSkipsMalformedMessages(t *testing.T) {
	_, urls := startNATS(t, 3)
	a, b := clusterNode(t, urls, ""), clusterNode(t, urls, "")
	a.createUser("fay", "acme")
	js := jetStream(t, urls)
	for _, bad := range []string{
		`{"Bucket":"ZXZlbnRz","Key":"YWNtZQ==","New":"eA=="}`, // a put over a tenant's bucket of events
		`{"Bucket":"dXNlcnM=","Key":"ZmF5","New":"eA=="}`,     // a user that is not one
		`{"Events":[{"Tenant":"","Name":"x"}]}`, `{"Events":[null]}`, `not json`,
		`{"Events":[{"Tenant":"acme","Name":"x","Data":"MQoKZXZlbnQ6Zm9yZ2Vk"}]}`, // data with a frame in it
	} {
		if _, err := js.Publish(context.Background(), "broker", []byte(bad)); err != nil {
			t.Fatal(err)
		}
	}
	known(t, b, "fay")
	jwt := b.login("fay")
	for i, n := range []*testBroker{a, b} {
		if id := n.insert(jwt, "e", 1); id != uint64(i+1) {
			t.Fatalf("insert %d: ID %d; want %d", i, id, i+1)
		}
		n.must(200, "GET", "/", nil)
		n.must(200, "POST", "/get_user", obj{"admin_token": "letmein", "username": "fay"})
	}
}

// BenchmarkClusterInsert measures inserts per second over 32 concurrent clients spread
// over the nodes, and the time from an insert's answer to its delivery on a stream of
// another node (p50, p99): on one node without NATS (fsync'd), and on three nodes sharing
// a three-replica log.
func BenchmarkClusterInsert(bm *testing.B) {
	for _, nodes := range []int{1, 3} {
		bm.Run(fmt.Sprint("nodes=", nodes), func(bm *testing.B) {
			urls := ""
			if nodes > 1 {
				_, urls = startNATS(bm, 3)
			}
			var bases []string
			for range nodes {
				bases = append(bases, benchNode(bm, urls))
			}
			benchInserts(bm, bases)
		})
	}
}

// benchNode starts a broker on the cluster at urls (none: alone) and returns its URL.
func benchNode(bm *testing.B, urls string) string {
	cfg := testConfig(bm)
	cfg.cluster = clusterConfig{nats: urls, stream: "broker", replicas: 3}
	s, err := newServer(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Now)
	if err != nil {
		bm.Fatal(err)
	}
	ts := httptest.NewServer(s.routes())
	bm.Cleanup(func() { s.hub.closeStreams(); ts.Close(); s.close() })
	return ts.URL
}

// benchPost sends a POST and returns the status and the answer.
func benchPost(client *http.Client, url, body string, hdr ...string) (int, []byte) {
	req, _ := http.NewRequest("POST", url, strings.NewReader(body))
	if len(hdr) == 2 {
		req.Header.Set(hdr[0], hdr[1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// benchUser creates user name on the first node and returns its JWT from the last.
func benchUser(bm *testing.B, bases []string, name string) string {
	if code, out := benchPost(http.DefaultClient, bases[0]+"/create_user", `{"username":"`+name+`","password":"pw-bench","admin_token":"letmein","tenant_name":"bench"}`); code != 200 {
		bm.Fatalf("create_user: %d %s", code, out)
	}
	var jwt struct{ JWT string }
	for deadline := time.Now().Add(10 * time.Second); jwt.JWT == ""; time.Sleep(10 * time.Millisecond) { // polling, bounded by the deadline
		if code, _ := benchPost(http.DefaultClient, bases[len(bases)-1]+"/get_user", `{"admin_token":"letmein","username":"`+name+`"}`); code == 200 {
			_, out := benchPost(http.DefaultClient, bases[len(bases)-1]+"/login", `{"username":"`+name+`","password":"pw-bench"}`)
			json.Unmarshal(out, &jwt)
		} else if time.Now().After(deadline) {
			bm.Fatal("the user did not reach the last node")
		}
	}
	return jwt.JWT
}

// benchStream opens a stream of jwt's tenant on base.
func benchStream(bm *testing.B, base, jwt string) *http.Response {
	req, _ := http.NewRequest("GET", base+"/sse", nil)
	req.Header.Set("Authorization", "Bearer "+jwt)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		bm.Fatal("GET /sse:", err, resp)
	}
	bm.Cleanup(func() { resp.Body.Close() })
	return resp
}

// BenchmarkClusterRevocation measures the time from a revocation sent to node C to the end
// of the user's stream on node A.
func BenchmarkClusterRevocation(bm *testing.B) {
	_, urls := startNATS(bm, 3)
	a, c := benchNode(bm, urls), benchNode(bm, urls)
	jwt := benchUser(bm, []string{a, a}, "rev")
	var delays []time.Duration
	for range bm.N {
		resp := benchStream(bm, a, jwt)
		start := time.Now()
		if code, out := benchPost(http.DefaultClient, c+"/revoke_user", `{"admin_token":"letmein","username":"rev"}`); code != 200 {
			bm.Fatalf("revoke: %d %s", code, out)
		}
		io.Copy(io.Discard, resp.Body) // until the stream ends
		delays = append(delays, time.Since(start))
		benchPost(http.DefaultClient, c+"/unrevoke_user", `{"admin_token":"letmein","username":"rev"}`)
		var u struct{ Revoked bool }
		for u.Revoked = true; u.Revoked; time.Sleep(time.Millisecond) { // polling until A applied the unrevoke
			_, out := benchPost(http.DefaultClient, a+"/get_user", `{"admin_token":"letmein","username":"rev"}`)
			json.Unmarshal(out, &u)
		}
		_, out := benchPost(http.DefaultClient, a+"/login", `{"username":"rev","password":"pw-bench"}`)
		var j struct{ JWT string }
		json.Unmarshal(out, &j)
		jwt = j.JWT
	}
	slices.Sort(delays)
	bm.ReportMetric(float64(delays[len(delays)/2].Microseconds())/1000, "p50-ms")
	bm.ReportMetric(float64(delays[len(delays)*99/100].Microseconds())/1000, "p99-ms")
	bm.ReportMetric(0, "ns/op")
}

// benchInserts runs bm.N inserts from 32 clients over the nodes at bases and reports the
// inserts per second and the delivery delays on a stream of the last node.
func benchInserts(bm *testing.B, bases []string) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	jwt := benchUser(bm, bases, "bench")
	resp := benchStream(bm, bases[len(bases)-1], jwt)
	delays, all := make([]time.Duration, 0, bm.N), make(chan struct{})
	go func() {
		r := bufio.NewReader(resp.Body)
		for len(delays) < bm.N {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			var d struct{ T int64 }
			if strings.HasPrefix(line, "data:") && json.Unmarshal([]byte(line[5:]), &d) == nil {
				delays = append(delays, time.Since(time.Unix(0, d.T)))
			}
		}
		close(all)
	}()
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	bm.ResetTimer()
	start := time.Now()
	for range 32 {
		wg.Go(func() {
			for i := next.Add(1); i <= int64(bm.N); i = next.Add(1) {
				body := fmt.Sprintf(`{"event":"e","data":{"t":%d}}`, time.Now().UnixNano())
				if code, _ := benchPost(client, bases[int(i)%len(bases)]+"/insert", body, "Authorization", "Bearer "+jwt); code != 200 {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if failed.Load() > 0 {
		bm.Fatalf("%d inserts failed", failed.Load())
	}
	<-all
	bm.StopTimer()
	slices.Sort(delays)
	bm.ReportMetric(float64(bm.N)/elapsed.Seconds(), "inserts/s")
	bm.ReportMetric(float64(delays[len(delays)/2].Microseconds())/1000, "p50-ms")
	bm.ReportMetric(float64(delays[len(delays)*99/100].Microseconds())/1000, "p99-ms")
}
