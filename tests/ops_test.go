package tests

import (
	"context"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/cairnkms/cairn/cmd/cairn/chain"
	"github.com/cairnkms/cairn/deploy/monitoring"
	"github.com/cairnkms/cairn/internal/identity"
	"github.com/cairnkms/cairn/tests/framework"
)

// opsSeries are the series every server of a kind must expose, with the
// value each must have on a chain that is up and serving (NaN: any value).
var opsSeries = map[string]map[string]float64{
	"distributor": {
		"cairn_distributor_sealed": 0, "cairn_distributor_ready": 1,
		"cairn_distributor_ceremonies_open": nan, "cairn_distributor_ceremony_shares_received": nan,
		"cairn_distributor_ceremony_shares_required": nan,
	},
	"rootkms": {
		"cairn_rootkms_ready": 1, "cairn_rootkms_raft_has_leader": 1, "cairn_rootkms_raft_leader": nan,
		"cairn_rootkms_raft_term": nan, "cairn_rootkms_raft_commit_index": nan, "cairn_rootkms_raft_applied_index": nan,
		"cairn_rootkms_raft_last_contact_seconds": nan, "cairn_rootkms_snapshot_age_seconds": nan,
		"cairn_rootkms_regions": 2, "cairn_rootkms_keysets": nan,
	},
	"kms": {
		"cairn_kms_ready": 1, "cairn_kms_bundle_serial": nan, "cairn_kms_keysets": nan,
		"cairn_kms_bundle_applied_timestamp_seconds": nan, "cairn_kms_bundle_created_timestamp_seconds": nan,
		"cairn_kms_usage_history_lost": 0,
	},
}

// opsCommon are series every server exposes: its own registry holds the Go
// runtime and process collectors.
var opsCommon = []string{"go_goroutines", "go_memstats_heap_inuse_bytes", "process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds", "cairn_build_info"}

// opsServices are the services grpcurl must list on each kind of server.
var opsServices = map[string][]string{
	"distributor": {"cairn.distributor.v1.Distributor"},
	"rootkms":     {"cairn.rootkms.v1.RootKMS"},
	"kms":         {"cairn.kms.v1.KMS", "cairn.kms.v1.KMSAdmin"},
}

var nan = math.NaN()

// scrape reads a server's /metrics.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := httpGet(t, "http://"+addr+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET http://%s/metrics = %d", addr, code)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("http://%s/metrics does not parse: %v", addr, err)
	}
	return fams
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// value is the value of a family's only unlabelled series (gauge, counter
// or untyped).
func value(f *dto.MetricFamily) (float64, bool) {
	for _, m := range f.GetMetric() {
		switch {
		case m.GetGauge() != nil:
			return m.GetGauge().GetValue(), true
		case m.GetCounter() != nil:
			return m.GetCounter().GetValue(), true
		case m.GetUntyped() != nil:
			return m.GetUntyped().GetValue(), true
		}
	}
	return 0, false
}

// TestUpOps: every server of a `cairn up` chain — three distributors, three
// root KMS voters, four KMS servers — answers an operator's tools: its ops
// listener serves /metrics (with the Go and process collectors and the
// named Cairn series), /healthz and /readyz; grpc.health.v1 says SERVING;
// and the real grpcurl lists its services by reflection and calls the health
// check, with the certificate flags the README shows. Every metric the
// shipped dashboard and alert rules use is exported by some server.
func TestUpOps(t *testing.T) {
	testStart := time.Now()
	regions := chain.DefaultRegions
	base := framework.FreeBasePort(t, regions)
	dir := t.TempDir()
	grpcurl := bin.Grpcurl(t)
	logs := dir + "/logs"
	l := framework.StartLauncher(t, bin, "cairn-up", logs, dir+"/state", "--base-port", strconv.Itoa(base), "--safes", "file")
	ready := l.WaitReady()
	t.Logf("chain ready in %s", ready.Round(100*time.Millisecond))
	info := l.Info()
	id := info.Regionctl.Identity

	exported := map[string]bool{"up": true} // Prometheus adds up to every target
	leaders := 0
	kinds := map[string]int{}
	for _, c := range info.Components {
		kinds[c.Kind]++
		t.Run(c.Name, func(t *testing.T) {
			if c.MetricsAddress == "" {
				t.Fatalf("chain.json: %s has no ops listener", c.Name)
			}
			fams := scrape(t, c.MetricsAddress)
			for name := range fams {
				exported[name] = true
			}
			for _, name := range opsCommon {
				if fams[name] == nil {
					t.Errorf("%s /metrics: no %s", c.Name, name)
				}
			}
			if v, _ := value(fams["cairn_build_info"]); v != 1 {
				t.Errorf("%s: cairn_build_info = %v, want 1", c.Name, v)
			}
			want, ok := opsSeries[c.Kind]
			if !ok {
				t.Fatalf("component %s of unknown kind %q", c.Name, c.Kind)
			}
			for name, w := range want {
				f := fams[name]
				if f == nil {
					t.Errorf("%s /metrics: no %s", c.Name, name)
					continue
				}
				v, ok := value(f)
				if !ok || (!math.IsNaN(w) && v != w) {
					t.Errorf("%s: %s = %v, want %v", c.Name, name, v, w)
				}
			}
			if c.Kind == "rootkms" {
				if v, _ := value(fams["cairn_rootkms_raft_leader"]); v == 1 {
					leaders++
				}
				for _, name := range []string{"cairn_rootkms_raft_term", "cairn_rootkms_raft_commit_index", "cairn_rootkms_raft_applied_index"} {
					if v, _ := value(fams[name]); v < 1 {
						t.Errorf("%s: %s = %v, want at least 1 on a running cluster", c.Name, name, v)
					}
				}
			}
			if code, body := httpGet(t, "http://"+c.MetricsAddress+"/healthz"); code != 200 {
				t.Errorf("%s /healthz = %d %q, want 200", c.Name, code, body)
			}
			if code, body := httpGet(t, "http://"+c.MetricsAddress+"/readyz"); code != 200 {
				t.Errorf("%s /readyz = %d %q, want 200 on a serving chain", c.Name, code, body)
			}
			if got := healthCheck(t, c.Address, id, info.TrustDomain); got != healthpb.HealthCheckResponse_SERVING {
				t.Errorf("%s grpc.health.v1 = %v, want SERVING", c.Name, got)
			}

			// grpcurl, as the README shows it.
			tlsFlags := []string{"-cacert", id.CA, "-cert", id.Cert, "-key", id.Key}
			out := runGrpcurl(t, grpcurl, logs, append(tlsFlags, c.Address, "list")...)
			services := strings.Fields(out)
			for _, s := range append([]string{"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"}, opsServices[c.Kind]...) {
				if !slices.Contains(services, s) {
					t.Errorf("grpcurl list %s (%s) = %q, want %s", c.Address, c.Name, services, s)
				}
			}
			out = runGrpcurl(t, grpcurl, logs, append(tlsFlags, c.Address, "grpc.health.v1.Health/Check")...)
			var hc struct{ Status string }
			if err := json.Unmarshal([]byte(out), &hc); err != nil || hc.Status != "SERVING" {
				t.Errorf("grpcurl %s grpc.health.v1.Health/Check = %q, want status SERVING", c.Name, out)
			}
			if svc := opsServices[c.Kind][0]; !strings.Contains(runGrpcurl(t, grpcurl, logs, append(tlsFlags, c.Address, "describe", svc)...), "service "+strings.TrimPrefix(svc, svc[:strings.LastIndex(svc, ".")+1])) {
				t.Errorf("grpcurl describe %s on %s does not describe the service", svc, c.Name)
			}
		})
	}
	if kinds["distributor"] != 3 || kinds["rootkms"] != 3 || kinds["kms"] != 2*len(regions) {
		t.Errorf("chain components by kind = %v, want 3 distributors, 3 root KMS, %d KMS", kinds, 2*len(regions))
	}
	if leaders != 1 {
		t.Errorf("%d root KMS replicas report cairn_rootkms_raft_leader 1, want exactly 1", leaders)
	}

	// Per-keyset counters: the demo encrypted and decrypted with
	// demo/notes in the first region.
	k1 := framework.Component(t, info, regions[0]+"/kms-1")
	k2 := framework.Component(t, info, regions[0]+"/kms-2")
	found := false
	for _, k := range []chain.Component{k1, k2} {
		for _, m := range scrape(t, k.MetricsAddress)["cairn_kms_keyset_requests_total"].GetMetric() {
			for _, lp := range m.GetLabel() {
				found = found || (lp.GetName() == "keyset" && strings.HasPrefix(lp.GetValue(), "demo/"))
			}
		}
	}
	if !found {
		t.Errorf("no KMS server of %s has cairn_kms_keyset_requests_total for a demo keyset after the demo ran", regions[0])
	}
	checkChainTransit(t, info, regions[0])
	checkDashboardMetrics(t, exported)
	t.Logf("every server's ops listener, health and reflection checked in %s", time.Since(testStart).Round(100*time.Millisecond))

	// Stopped, the chain left no root key, share or passphrase in any file
	// (the operator tools' output included).
	l.Send(syscall.SIGTERM)
	if code := l.ExitCode(); code != 0 {
		t.Fatalf("cairn up: exit %d after SIGTERM, want 0\n%s", code, l.Stdout())
	}
	requireNoUpSecrets(t, dir+"/state", nil, logs)
}

// healthCheck asks the server's grpc.health.v1 over mTLS as id, verifying
// the server by its SPIFFE ID as every Cairn client does.
func healthCheck(t *testing.T, addr string, id chain.Identity, td string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	src := identitySource(t, id, td)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(identity.ClientCredentials(src, identity.MemberOf(src.TrustDomain()))))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Errorf("grpc.health.v1 Check %s: %v", addr, err)
	}
	return resp.GetStatus()
}

// identitySource loads an identity of the chain.
func identitySource(t *testing.T, id chain.Identity, td string) *identity.Source {
	t.Helper()
	src, err := identity.NewSource(identity.SourceConfig{CertFile: id.Cert, KeyFile: id.Key, BundleFile: id.CA,
		TrustDomain: spiffeid.RequireTrustDomainFromString(td)})
	if err != nil {
		t.Fatal(err)
	}
	return src
}

// runGrpcurl runs the real grpcurl (its output kept in logDir) and returns
// its stdout; a failure fails the test with its stderr.
func runGrpcurl(t *testing.T, grpcurl, logDir string, args ...string) string {
	t.Helper()
	r := framework.Run(t, "grpcurl", logDir, grpcurl, args)
	if r.ExitCode != 0 {
		t.Errorf("grpcurl %s: exit %d\n%s", strings.Join(args, " "), r.ExitCode, r.Stderr)
	}
	return r.Stdout
}

// checkDashboardMetrics checks that every metric the shipped alert rules and
// dashboard use is one some server of the chain exports.
func checkDashboardMetrics(t *testing.T, exported map[string]bool) {
	t.Helper()
	names, err := monitoring.MetricNames()
	if err != nil {
		t.Fatalf("deploy/monitoring: %v", err)
	}
	if len(names) < 10 {
		t.Fatalf("deploy/monitoring references %d metrics (%v); the check cannot see what it looks for", len(names), names)
	}
	for _, n := range names {
		base := n
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(n, suffix); ok && exported[b] {
				base = b
			}
		}
		if !exported[base] {
			t.Errorf("deploy/monitoring uses %s, which no server of the chain exports", n)
		}
	}
}

// checkChainTransit calls a KMS server's Vault-transit listener of the chain
// as the README shows: encrypt and decrypt with demo/notes as the region's
// demo client.
func checkChainTransit(t *testing.T, info *chain.Info, region string) {
	t.Helper()
	r, ok := info.Region(region)
	if !ok {
		t.Fatalf("chain.json has no region %s", region)
	}
	k := framework.Component(t, info, region+"/kms-1")
	if k.TransitAddress == "" {
		t.Fatalf("chain.json: %s has no transit listener", k.Name)
	}
	src := identitySource(t, r.Client, info.TrustDomain)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: identity.ClientTLSConfig(src, identity.MemberOf(src.TrustDomain()))}}
	defer c.CloseIdleConnections()
	post := func(path, body string) map[string]any {
		t.Helper()
		resp, err := c.Post("https://"+k.TransitAddress+"/v1/transit/"+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatalf("POST %s: %v", path, err)
		}
		defer resp.Body.Close()
		var out struct {
			Data   map[string]any
			Errors []string
		}
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("POST %s = %d %v %v", path, resp.StatusCode, out.Errors, err)
		}
		return out.Data
	}
	// "hello" and "invoice-7" in base64.
	enc := post("encrypt/demo/notes", `{"plaintext":"aGVsbG8=","associated_data":"aW52b2ljZS03"}`)
	ct, _ := enc["ciphertext"].(string)
	if !strings.HasPrefix(ct, "vault:v") {
		t.Fatalf("transit encrypt on %s = %v, want a vault:v<N>: ciphertext", k.Name, enc)
	}
	dec := post("decrypt/demo/notes", `{"ciphertext":"`+ct+`","associated_data":"aW52b2ljZS03"}`)
	if dec["plaintext"] != "aGVsbG8=" {
		t.Errorf("transit decrypt on %s = %v, want the plaintext back", k.Name, dec)
	}
}
