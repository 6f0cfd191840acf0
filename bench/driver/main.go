// etcdbench-driver: the load generator for the watch, idle and lease
// workloads (W4-W7) of the etcdgrpcproxy bench suite.
//
// It speaks etcd's v3 gRPC API directly (etcdserverpb + grpc-go, both from
// Debian's golang-*-dev packages; built with GO111MODULE=off), so it is the
// same kind of client as etcd's own tools/benchmark, which covers W1-W3.
//
// Protocol with bench/run.py: the driver prints one JSON object per line on
// stdout; every object has "phase". After a phase line other than "exit" the
// driver waits for one line on stdin before going on (so the harness can
// sample CPU, RSS and etcd's /metrics at well-defined points); EOF on stdin
// aborts. Failures are reported in the objects ("errors", "error_samples");
// a fatal one ends the driver with a {"phase":"fatal"} line and exit code 2.
//
//	etcdbench-driver watchfan -endpoint E -watchers N ...  (W4)
//	etcdbench-driver idle     -endpoint E -watchers N | -conns C ...  (W5, W6)
//	etcdbench-driver leases   -endpoint E -clients N [-shared] ...  (W6)
//	etcdbench-driver maint    -endpoint ETCD [-put-key K]  (compact + defrag)
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/etcdserver/etcdserverpb"
	"go.etcd.io/etcd/mvcc/mvccpb"
	"google.golang.org/grpc"
)

// ---------------------------------------------------------------- plumbing

var (
	outMu sync.Mutex
	stdin = bufio.NewReader(os.Stdin)
)

func emit(obj map[string]interface{}) {
	b, err := json.Marshal(obj)
	if err != nil {
		b = []byte(fmt.Sprintf(`{"phase":"fatal","message":%q}`, err.Error()))
	}
	outMu.Lock()
	os.Stdout.Write(append(b, '\n'))
	outMu.Unlock()
}

func fatalf(format string, args ...interface{}) {
	emit(map[string]interface{}{"phase": "fatal", "message": fmt.Sprintf(format, args...)})
	os.Exit(2)
}

// phase prints a phase line and waits for the harness to answer.
func phase(obj map[string]interface{}) {
	emit(obj)
	if _, err := stdin.ReadString('\n'); err != nil {
		fmt.Fprintln(os.Stderr, "stdin closed; aborting")
		os.Exit(3)
	}
}

// errorLog counts errors by kind and keeps a few samples.
type errorLog struct {
	mu      sync.Mutex
	counts  map[string]int64
	samples []string
}

func newErrorLog() *errorLog { return &errorLog{counts: map[string]int64{}} }

func (e *errorLog) add(kind string, format string, args ...interface{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.counts[kind]++
	if len(e.samples) < 10 {
		e.samples = append(e.samples, kind+": "+fmt.Sprintf(format, args...))
	}
}

func (e *errorLog) addN(kind string, n int64) {
	if n == 0 {
		return
	}
	e.mu.Lock()
	e.counts[kind] += n
	e.mu.Unlock()
}

func (e *errorLog) snapshot() (map[string]int64, []string, int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	c := map[string]int64{}
	var total int64
	for k, v := range e.counts {
		c[k] = v
		total += v
	}
	return c, append([]string(nil), e.samples...), total
}

func (e *errorLog) into(obj map[string]interface{}) {
	c, s, total := e.snapshot()
	obj["errors"] = c
	obj["error_samples"] = s
	obj["error_total"] = total
}

func dialOne(endpoint string, timeout time.Duration) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return grpc.DialContext(ctx, endpoint, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)))
}

// dialMany opens n connections (each its own HTTP/2 connection), up to 32 at
// a time.
func dialMany(endpoint string, n int, timeout time.Duration) []*grpc.ClientConn {
	conns := make([]*grpc.ClientConn, n)
	errs := make([]error, n)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			conns[i], errs[i] = dialOne(endpoint, timeout)
		}(i)
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			fatalf("dial %s (connection %d of %d): %v", endpoint, i+1, n, err)
		}
	}
	return conns
}

func closeAll(conns []*grpc.ClientConn) {
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
}

func ceilDiv(a, b int) int {
	if b <= 0 {
		b = 1
	}
	return (a + b - 1) / b
}

// runParallel calls f(0..n-1), at most par at a time; false on timeout.
func runParallel(n, par int, timeout time.Duration, f func(i int)) bool {
	sem := make(chan struct{}, par)
	var wg sync.WaitGroup
	done := make(chan struct{})
	go func() {
		for i := 0; i < n; i++ {
			wg.Add(1)
			sem <- struct{}{}
			go func(i int) {
				defer wg.Done()
				defer func() { <-sem }()
				f(i)
			}(i)
		}
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	idx := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	if idx < 0 {
		idx = 0
	}
	if idx >= len(sorted) {
		idx = len(sorted) - 1
	}
	return sorted[idx]
}

func latencySummary(prefix string, lats []float64, obj map[string]interface{}) {
	sort.Float64s(lats)
	obj[prefix+"_count"] = len(lats)
	obj[prefix+"_p50_ms"] = percentile(lats, 50) * 1000
	obj[prefix+"_p99_ms"] = percentile(lats, 99) * 1000
	if len(lats) > 0 {
		obj[prefix+"_max_ms"] = lats[len(lats)-1] * 1000
	} else {
		obj[prefix+"_max_ms"] = 0.0
	}
}

// ------------------------------------------------------------------ watchers

// watchStream is one Watch stream and the watchers created on it, one after
// the other.
type watchStream struct {
	idx      int
	stream   pb.Watch_WatchClient
	cancel   context.CancelFunc
	watchers map[int64]*watcher // by watch_id
	done     chan struct{}      // closed when its receive loop ends
}

// watcher is one watch on a stream; what it receives is checked per
// (stream, watch_id).
type watcher struct {
	idx     int // over all streams
	stream  int
	watchID int64
	lastRev int64
	count   int64
	sumSeq  int64
	dups    int64
	reorder int64
}

func (w *watcher) String() string {
	return fmt.Sprintf("watcher %d (stream %d, watch_id %d)", w.idx, w.stream, w.watchID)
}

// openWatchers opens ceil(n/perStream) watch streams, spread round-robin
// over conns, and creates perStream watchers on each (the last one may get
// fewer), watcher i on keyOf(i); it waits for every "created" answer.
func openWatchers(conns []*grpc.ClientConn, n, perStream int, keyOf func(i int) string, par int,
	timeout time.Duration, errs *errorLog) []*watchStream {
	if perStream < 1 {
		perStream = 1
	}
	streams := make([]*watchStream, ceilDiv(n, perStream))
	var failed int64
	ok := runParallel(len(streams), par, timeout, func(s int) {
		last := s*perStream + perStream
		if last > n {
			last = n
		}
		ws, err := openStream(conns[s%len(conns)], s, s*perStream, last, keyOf)
		if err != nil {
			atomic.AddInt64(&failed, 1)
			errs.add("watch_open", "stream %d: %v", s, err)
			return
		}
		streams[s] = ws
	})
	if !ok {
		fatalf("creating %d watchers did not finish within %s", n, timeout)
	}
	if failed > 0 {
		_, s, _ := errs.snapshot()
		fatalf("%d of %d watch streams (%d watchers each) could not be set up: %s",
			failed, len(streams), perStream, strings.Join(s, "; "))
	}
	return streams
}

// openStream opens watch stream s on conn and creates the watchers
// first..last-1 on it, in turn.
func openStream(conn *grpc.ClientConn, s, first, last int, keyOf func(i int) string) (*watchStream, error) {
	ctx, cancel := context.WithCancel(context.Background())
	st, err := pb.NewWatchClient(conn).Watch(ctx)
	if err != nil {
		cancel()
		return nil, err
	}
	ws := &watchStream{idx: s, stream: st, cancel: cancel, watchers: map[int64]*watcher{},
		done: make(chan struct{})}
	for i := first; i < last; i++ {
		id, err := createWatch(st, keyOf(i))
		if err == nil && ws.watchers[id] != nil {
			err = fmt.Errorf("watch_id %d given twice on one stream", id)
		}
		if err != nil {
			cancel()
			return nil, fmt.Errorf("watcher %d: %v", i, err)
		}
		ws.watchers[id] = &watcher{idx: i, stream: s, watchID: id}
	}
	return ws, nil
}

// createWatch sends a create request on st and returns the watch_id of the
// "created" answer.
func createWatch(st pb.Watch_WatchClient, key string) (int64, error) {
	req := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
		CreateRequest: &pb.WatchCreateRequest{Key: []byte(key)}}}
	if err := st.Send(req); err != nil {
		return 0, fmt.Errorf("send: %v", err)
	}
	resp, err := st.Recv()
	if err != nil {
		return 0, err
	}
	if !resp.Created || resp.Canceled {
		return 0, fmt.Errorf("unexpected first response created=%v canceled=%v reason=%q",
			resp.Created, resp.Canceled, resp.CancelReason)
	}
	return resp.WatchId, nil
}

// receive reads ws until it ends and passes each response to handle with
// the watcher it is for. Errors (a failed stream, a cancelled watch, an
// unknown watch_id) are counted unless *stopping is set.
func (ws *watchStream) receive(stopping *int32, errs *errorLog, handle func(*watcher, *pb.WatchResponse)) {
	defer close(ws.done)
	for {
		resp, err := ws.stream.Recv()
		quiet := atomic.LoadInt32(stopping) != 0
		if err != nil {
			if !quiet {
				errs.add("watch_recv", "stream %d: %v", ws.idx, err)
			}
			return
		}
		w := ws.watchers[resp.WatchId]
		switch {
		case w == nil:
			errs.add("unknown_watch_id", "stream %d: watch_id %d", ws.idx, resp.WatchId)
		case resp.Canceled:
			if !quiet {
				errs.add("watch_canceled", "%v: reason=%q compact_revision=%d",
					w, resp.CancelReason, resp.CompactRevision)
			}
		default:
			handle(w, resp)
		}
	}
}

// stopStreams cancels every stream and waits (a bounded time) for its
// receive loop to end.
func stopStreams(streams []*watchStream) {
	for _, ws := range streams {
		ws.cancel()
	}
	for _, ws := range streams {
		select {
		case <-ws.done:
		case <-time.After(5 * time.Second):
		}
	}
}

// ------------------------------------------------------------------ watchfan

type fanState struct {
	n          int32
	counts     []int32 // per seq: watchers that got it
	sendNs     []int64 // per seq: when its Put was sent
	doneNs     []int64 // per seq: when the last watcher got it
	fullyDone  int64   // seqs delivered to every watcher
	mu         sync.Mutex
	cond       *sync.Cond
	stopping   int32
	errs       *errorLog
	valueBytes int
}

func (f *fanState) handle(w *watcher, resp *pb.WatchResponse) {
	if resp.CompactRevision != 0 {
		f.errs.add("watch_compacted", "%v: compact_revision=%d", w, resp.CompactRevision)
	}
	for _, ev := range resp.Events {
		f.event(w, ev)
	}
}

// event checks one event for w: a PUT of the next revision (not one it had,
// not an older one) whose value starts with a valid sequence number.
func (f *fanState) event(w *watcher, ev *mvccpb.Event) {
	if ev.Type != mvccpb.PUT || ev.Kv == nil {
		f.errs.add("unexpected_event", "%v: %v", w, ev.Type)
		return
	}
	rev := ev.Kv.ModRevision
	if rev == w.lastRev {
		w.dups++
		return
	}
	if rev < w.lastRev {
		w.reorder++
		return
	}
	w.lastRev = rev
	if len(ev.Kv.Value) < 10 {
		f.errs.add("bad_value", "%v: value %q", w, ev.Kv.Value)
		return
	}
	seq, perr := strconv.ParseInt(string(ev.Kv.Value[:10]), 10, 64)
	if perr != nil || seq < 1 || seq >= int64(len(f.counts)) {
		f.errs.add("bad_value", "%v: value %q", w, ev.Kv.Value[:10])
		return
	}
	w.count++
	w.sumSeq += seq
	if atomic.AddInt32(&f.counts[seq], 1) == f.n {
		atomic.StoreInt64(&f.doneNs[seq], time.Now().UnixNano())
		atomic.AddInt64(&f.fullyDone, 1)
		f.mu.Lock()
		f.cond.Broadcast()
		f.mu.Unlock()
	}
}

func cmdWatchfan(args []string) {
	fs := flag.NewFlagSet("watchfan", flag.ExitOnError)
	endpoint := fs.String("endpoint", "127.0.0.1:2379", "target gRPC endpoint (host:port)")
	nw := fs.Int("watchers", 100, "watchers on the key")
	perStream := fs.Int("per-stream", 1, "watchers per watch stream (created one after the other on it)")
	perConn := fs.Int("per-conn", 20, "watch streams per client connection")
	key := fs.String("key", "/bench/w4", "the watched key (use a fresh one per run)")
	writers := fs.Int("writers", 4, "concurrent writer goroutines (one connection)")
	window := fs.Int64("window", 4, "max puts not yet delivered to every watcher")
	duration := fs.Duration("duration", 5*time.Second, "how long the writers put (0: until -max-puts)")
	maxPuts := fs.Int("max-puts", 200000, "stop after this many puts")
	valSize := fs.Int("value-size", 128, "bytes per value (>= 10)")
	setupTimeout := fs.Duration("setup-timeout", 120*time.Second, "watcher creation timeout")
	drainTimeout := fs.Duration("drain-timeout", 60*time.Second, "wait for the last events after the writers stop")
	stallTimeout := fs.Duration("stall-timeout", 30*time.Second, "fail when no put is fully delivered for this long")
	fs.Parse(args)
	if *valSize < 10 {
		*valSize = 10
	}
	errs := newErrorLog()
	t0 := time.Now()
	conns := dialMany(*endpoint, ceilDiv(ceilDiv(*nw, *perStream), *perConn), 15*time.Second)
	streams := openWatchers(conns, *nw, *perStream, func(int) string { return *key }, 64, *setupTimeout, errs)
	setup := time.Since(t0).Seconds()

	f := &fanState{n: int32(*nw), counts: make([]int32, *maxPuts+1), sendNs: make([]int64, *maxPuts+1),
		doneNs: make([]int64, *maxPuts+1), errs: errs, valueBytes: *valSize}
	f.cond = sync.NewCond(&f.mu)
	for _, ws := range streams {
		go ws.receive(&f.stopping, errs, f.handle)
	}
	phase(map[string]interface{}{"phase": "ready", "setup_s": setup, "connections": len(conns),
		"streams": len(streams)})

	wconn, err := dialOne(*endpoint, 15*time.Second)
	if err != nil {
		fatalf("dial writer: %v", err)
	}
	kv := pb.NewKVClient(wconn)
	pad := strings.Repeat("x", *valSize-10)
	var issued int64
	var putErrs int64
	stalled := int32(0)
	start := time.Now()
	deadline := start.Add(*duration)
	if *duration <= 0 {
		deadline = start.Add(100 * 365 * 24 * time.Hour) // until -max-puts
	}
	// wake waiting writers now and then so they notice deadlines and stalls
	tick := time.NewTicker(50 * time.Millisecond)
	tickDone := make(chan struct{})
	go func() {
		for {
			select {
			case <-tick.C:
				f.mu.Lock()
				f.cond.Broadcast()
				f.mu.Unlock()
			case <-tickDone:
				return
			}
		}
	}()
	var lastProgress int64 = time.Now().UnixNano()
	var wg sync.WaitGroup
	for g := 0; g < *writers; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				var seq int64
				for {
					if time.Now().After(deadline) || atomic.LoadInt32(&stalled) != 0 || atomic.LoadInt64(&putErrs) > 0 {
						return
					}
					iss := atomic.LoadInt64(&issued)
					if iss >= int64(*maxPuts) {
						return
					}
					fd := atomic.LoadInt64(&f.fullyDone)
					if iss-fd < *window {
						if atomic.CompareAndSwapInt64(&issued, iss, iss+1) {
							seq = iss + 1
							break
						}
						continue
					}
					if time.Since(time.Unix(0, atomic.LoadInt64(&lastProgress))) > *stallTimeout {
						atomic.StoreInt32(&stalled, 1)
						return
					}
					f.mu.Lock()
					if atomic.LoadInt64(&f.fullyDone) == fd {
						f.cond.Wait()
					}
					f.mu.Unlock()
					if atomic.LoadInt64(&f.fullyDone) != fd {
						atomic.StoreInt64(&lastProgress, time.Now().UnixNano())
					}
				}
				val := fmt.Sprintf("%010d", seq) + pad
				atomic.StoreInt64(&f.sendNs[seq], time.Now().UnixNano())
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := kv.Put(ctx, &pb.PutRequest{Key: []byte(*key), Value: []byte(val)})
				cancel()
				if err != nil {
					atomic.AddInt64(&putErrs, 1)
					errs.add("put", "seq %d: %v", seq, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	putsEnd := time.Now()
	total := atomic.LoadInt64(&issued)
	// drain: wait until every put reached every watcher
	drainDeadline := time.Now().Add(*drainTimeout)
	for atomic.LoadInt64(&f.fullyDone) < total && time.Now().Before(drainDeadline) {
		f.mu.Lock()
		if atomic.LoadInt64(&f.fullyDone) < total {
			f.cond.Wait()
		}
		f.mu.Unlock()
	}
	close(tickDone)
	tick.Stop()
	// give a moment for stray duplicates to show up
	time.Sleep(100 * time.Millisecond)
	fully := atomic.LoadInt64(&f.fullyDone)
	var lastDone int64
	lats := make([]float64, 0, total)
	for s := int64(1); s <= total; s++ {
		d := atomic.LoadInt64(&f.doneNs[s])
		if d == 0 {
			continue
		}
		if d > lastDone {
			lastDone = d
		}
		lats = append(lats, float64(d-f.sendNs[s])/1e9)
	}
	elapsed := putsEnd.Sub(start).Seconds()
	if lastDone > 0 {
		elapsed = float64(lastDone-start.UnixNano()) / 1e9
	}
	atomic.StoreInt32(&f.stopping, 1)
	stopStreams(streams)
	delivered := checkWatchers(streams, total, errs)
	if atomic.LoadInt32(&stalled) != 0 {
		errs.add("stalled", "no put was fully delivered for %s (%d of %d)", *stallTimeout, fully, total)
	}
	if fully < total {
		errs.add("undelivered", "%d of %d puts not delivered to every watcher after %s", total-fully, total, *drainTimeout)
	}
	res := map[string]interface{}{
		"phase": "done", "watchers": *nw, "connections": len(conns), "streams": len(streams), "puts": total,
		"fully_delivered_puts": fully, "events_delivered": delivered, "elapsed_s": elapsed,
		"put_phase_s":  putsEnd.Sub(start).Seconds(),
		"events_per_s": float64(delivered) / math.Max(elapsed, 1e-9),
		"puts_per_s":   float64(total) / math.Max(elapsed, 1e-9),
		"window":       *window, "writers": *writers, "setup_s": setup,
	}
	latencySummary("last_watcher_latency", lats, res)
	errs.into(res)
	phase(res)
	wconn.Close()
	closeAll(conns)
	emit(map[string]interface{}{"phase": "exit"})
}

// checkWatchers counts, over every watcher, the events it lost, got twice
// or out of order, and a wrong set of sequence numbers, for total puts;
// returns the events delivered.
func checkWatchers(streams []*watchStream, total int64, errs *errorLog) int64 {
	var delivered, lost, dups, reorder, sumMismatch int64
	wantSum := total * (total + 1) / 2
	for _, ws := range streams {
		for _, w := range ws.watchers {
			delivered += w.count
			dups += w.dups
			reorder += w.reorder
			if w.count < total {
				lost += total - w.count
			}
			if w.count == total && w.sumSeq != wantSum {
				sumMismatch++
			}
		}
	}
	errs.addN("lost", lost)
	errs.addN("duplicated", dups)
	errs.addN("reordered", reorder)
	errs.addN("seq_mismatch", sumMismatch)
	return delivered
}

// ---------------------------------------------------------------------- idle

func cmdIdle(args []string) {
	fs := flag.NewFlagSet("idle", flag.ExitOnError)
	endpoint := fs.String("endpoint", "127.0.0.1:2379", "target gRPC endpoint")
	nw := fs.Int("watchers", 0, "idle watchers to hold open")
	nc := fs.Int("conns", 0, "idle connections to hold open (each makes one Range first)")
	perConn := fs.Int("per-conn", 20, "watch streams per connection (watchers mode)")
	keyMode := fs.String("key-mode", "distinct", "watchers on 'distinct' keys or all on the 'same' key")
	key := fs.String("key", "/bench/idle", "key (same) or key prefix (distinct)")
	setupTimeout := fs.Duration("setup-timeout", 180*time.Second, "setup timeout")
	fs.Parse(args)
	errs := newErrorLog()
	t0 := time.Now()
	var conns []*grpc.ClientConn
	var streams []*watchStream
	var stopping int32
	if *nw > 0 {
		conns = dialMany(*endpoint, ceilDiv(*nw, *perConn), 15*time.Second)
		keyOf := func(i int) string { return *key }
		if *keyMode == "distinct" {
			keyOf = func(i int) string { return fmt.Sprintf("%s/%06d", *key, i) }
		}
		streams = openWatchers(conns, *nw, 1, keyOf, 64, *setupTimeout, errs)
		for _, ws := range streams {
			// idle watchers expect no event at all: events are ignored
			go ws.receive(&stopping, errs, func(*watcher, *pb.WatchResponse) {})
		}
	} else if *nc > 0 {
		conns = dialMany(*endpoint, *nc, 15*time.Second)
		ok := runParallel(*nc, 32, *setupTimeout, func(i int) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if _, err := pb.NewKVClient(conns[i]).Range(ctx, &pb.RangeRequest{Key: []byte(*key), Serializable: true}); err != nil {
				errs.add("range", "connection %d: %v", i, err)
			}
		})
		if !ok {
			fatalf("first Range on %d connections did not finish within %s", *nc, *setupTimeout)
		}
	}
	ready := map[string]interface{}{"phase": "ready", "setup_s": time.Since(t0).Seconds(),
		"watchers": *nw, "connections": len(conns)}
	errs.into(ready)
	phase(ready)
	atomic.StoreInt32(&stopping, 1)
	stopStreams(streams)
	closeAll(conns)
	res := map[string]interface{}{"phase": "exit"}
	errs.into(res)
	emit(res)
}

// -------------------------------------------------------------------- leases

func cmdLeases(args []string) {
	fs := flag.NewFlagSet("leases", flag.ExitOnError)
	endpoint := fs.String("endpoint", "127.0.0.1:2379", "target gRPC endpoint")
	nclients := fs.Int("clients", 1000, "keep-alive clients (one LeaseKeepAlive stream each)")
	perConn := fs.Int("per-conn", 20, "clients per connection")
	shared := fs.Bool("shared", false, "all clients keep one lease alive (else one lease each)")
	ttl := fs.Int64("ttl", 6, "lease TTL in seconds")
	interval := fs.Duration("interval", 2*time.Second, "keep-alive interval of each client (clientv3 uses TTL/3)")
	duration := fs.Duration("duration", 6*time.Second, "measurement window")
	setupTimeout := fs.Duration("setup-timeout", 120*time.Second, "setup timeout")
	fs.Parse(args)
	errs := newErrorLog()
	t0 := time.Now()
	conns := dialMany(*endpoint, ceilDiv(*nclients, *perConn), 15*time.Second)
	nleases := *nclients
	if *shared {
		nleases = 1
	}
	leases := make([]int64, nleases)
	ok := runParallel(nleases, 32, *setupTimeout, func(i int) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		r, err := pb.NewLeaseClient(conns[i%len(conns)]).LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: *ttl})
		if err != nil {
			errs.add("grant", "lease %d: %v", i, err)
			return
		}
		leases[i] = r.ID
	})
	if !ok {
		fatalf("granting %d leases did not finish within %s", nleases, *setupTimeout)
	}
	if _, _, n := errs.snapshot(); n > 0 {
		_, s, _ := errs.snapshot()
		fatalf("lease grants failed: %s", strings.Join(s, "; "))
	}
	phase(map[string]interface{}{"phase": "ready", "setup_s": time.Since(t0).Seconds(), "leases": nleases,
		"connections": len(conns)})

	var sent, recv int64
	firstLat := make([]float64, *nclients)
	var firstDone int64
	stop := make(chan struct{})
	var stopping int32
	var wg sync.WaitGroup
	startAll := time.Now()
	for i := 0; i < *nclients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			// spread the clients' starts over one interval: a steady rate
			offset := time.Duration(int64(*interval) * int64(i) / int64(*nclients))
			select {
			case <-time.After(time.Until(startAll.Add(offset))):
			case <-stop:
				return
			}
			id := leases[i%nleases]
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			st, err := pb.NewLeaseClient(conns[i%len(conns)]).LeaseKeepAlive(ctx)
			if err != nil {
				errs.add("keepalive_open", "client %d: %v", i, err)
				return
			}
			ts := time.Now()
			if err := st.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
				errs.add("keepalive_send", "client %d: %v", i, err)
				return
			}
			atomic.AddInt64(&sent, 1)
			recvDone := make(chan struct{})
			go func() {
				defer close(recvDone)
				first := true
				for {
					r, err := st.Recv()
					if err != nil {
						if atomic.LoadInt32(&stopping) == 0 {
							errs.add("keepalive_recv", "client %d: %v", i, err)
						}
						return
					}
					if first {
						firstLat[i] = time.Since(ts).Seconds()
						atomic.AddInt64(&firstDone, 1)
						first = false
					}
					atomic.AddInt64(&recv, 1)
					if r.ID != id || r.TTL <= 0 {
						errs.add("keepalive_answer", "client %d: lease %x answered ID=%x TTL=%d", i, id, r.ID, r.TTL)
					}
				}
			}()
			t := time.NewTicker(*interval)
			defer t.Stop()
			for {
				select {
				case <-stop:
					cancel()
					<-recvDone
					return
				case <-recvDone:
					return
				case <-t.C:
					if err := st.Send(&pb.LeaseKeepAliveRequest{ID: id}); err != nil {
						if atomic.LoadInt32(&stopping) == 0 {
							errs.add("keepalive_send", "client %d: %v", i, err)
						}
						return
					}
					atomic.AddInt64(&sent, 1)
				}
			}
		}(i)
	}
	// steady state: every client started and got its first answer
	steadyDeadline := time.Now().Add(*interval + *setupTimeout)
	for atomic.LoadInt64(&firstDone) < int64(*nclients) && time.Now().Before(steadyDeadline) {
		if _, _, n := errs.snapshot(); n > 0 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := atomic.LoadInt64(&firstDone); got < int64(*nclients) {
		errs.add("no_first_answer", "%d of %d clients got no first keep-alive answer", int64(*nclients)-got, *nclients)
	}
	steady := map[string]interface{}{"phase": "steady", "sent": atomic.LoadInt64(&sent),
		"received": atomic.LoadInt64(&recv), "start_s": time.Since(startAll).Seconds()}
	errs.into(steady)
	phase(steady)
	time.Sleep(*duration)
	measured := map[string]interface{}{"phase": "measured", "sent": atomic.LoadInt64(&sent),
		"received": atomic.LoadInt64(&recv)}
	errs.into(measured)
	phase(measured)
	atomic.StoreInt32(&stopping, 1)
	close(stop)
	wg.Wait()
	// revoke, so etcd does not keep them
	revokeErrs := int64(0)
	runParallel(nleases, 32, 60*time.Second, func(i int) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := pb.NewLeaseClient(conns[i%len(conns)]).LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: leases[i]}); err != nil {
			atomic.AddInt64(&revokeErrs, 1)
		}
	})
	closeAll(conns)
	var lats []float64
	for _, l := range firstLat {
		if l > 0 {
			lats = append(lats, l)
		}
	}
	res := map[string]interface{}{"phase": "exit", "clients": *nclients, "leases": nleases,
		"sent": atomic.LoadInt64(&sent), "received": atomic.LoadInt64(&recv), "revoke_errors": revokeErrs}
	latencySummary("first_answer", lats, res)
	errs.into(res)
	emit(res)
}

// --------------------------------------------------------------------- maint

// cmdMaint writes a key (optional), then compacts etcd at its current
// revision (physical) and defragments it; run against etcd itself.
func cmdMaint(args []string) {
	fs := flag.NewFlagSet("maint", flag.ExitOnError)
	endpoint := fs.String("endpoint", "127.0.0.1:2379", "etcd gRPC endpoint (not a proxy)")
	putKey := fs.String("put-key", "", "put this key first")
	putSize := fs.Int("put-size", 256, "value size for -put-key")
	compact := fs.Bool("compact", true, "compact at the current revision")
	defrag := fs.Bool("defrag", true, "defragment")
	timeout := fs.Duration("timeout", 60*time.Second, "overall timeout")
	fs.Parse(args)
	conn, err := dialOne(*endpoint, 15*time.Second)
	if err != nil {
		fatalf("dial %s: %v", *endpoint, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	kv := pb.NewKVClient(conn)
	mc := pb.NewMaintenanceClient(conn)
	res := map[string]interface{}{"phase": "exit"}
	if *putKey != "" {
		if _, err := kv.Put(ctx, &pb.PutRequest{Key: []byte(*putKey), Value: []byte(strings.Repeat("v", *putSize))}); err != nil {
			fatalf("put %q: %v", *putKey, err)
		}
	}
	st, err := mc.Status(ctx, &pb.StatusRequest{})
	if err != nil {
		fatalf("status: %v", err)
	}
	rev := st.Header.Revision
	res["revision"] = rev
	res["db_size_before"] = st.DbSize
	if *compact {
		if _, err := kv.Compact(ctx, &pb.CompactionRequest{Revision: rev, Physical: true}); err != nil &&
			!strings.Contains(err.Error(), "compacted") {
			fatalf("compact at %d: %v", rev, err)
		}
	}
	if *defrag {
		if _, err := mc.Defragment(ctx, &pb.DefragmentRequest{}); err != nil {
			fatalf("defragment: %v", err)
		}
	}
	if st2, err := mc.Status(ctx, &pb.StatusRequest{}); err == nil {
		res["db_size_after"] = st2.DbSize
	}
	emit(res)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: etcdbench-driver watchfan|idle|leases|maint [flags]")
		os.Exit(1)
	}
	switch os.Args[1] {
	case "watchfan":
		cmdWatchfan(os.Args[2:])
	case "idle":
		cmdIdle(os.Args[2:])
	case "leases":
		cmdLeases(os.Args[2:])
	case "maint":
		cmdMaint(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n", os.Args[1])
		os.Exit(1)
	}
}
