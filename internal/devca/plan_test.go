package devca_test

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/internal/devca"
	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestDefaultPlanIDs(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	p := devca.DefaultPlan(td)
	if err := p.Validate(); err != nil {
		t.Fatalf("DefaultPlan(%s).Validate() = %v, want nil", td, err)
	}
	var got []string
	for _, id := range p.IDs() {
		got = append(got, id.String())
	}
	want := []string{
		"spiffe://dev.cairn.test/distributor/global/distributor-1",
		"spiffe://dev.cairn.test/distributor/global/distributor-2",
		"spiffe://dev.cairn.test/distributor/global/distributor-3",
		"spiffe://dev.cairn.test/rootkms/global/rootkms-1",
		"spiffe://dev.cairn.test/rootkms/global/rootkms-2",
		"spiffe://dev.cairn.test/rootkms/global/rootkms-3",
		"spiffe://dev.cairn.test/kms/us-east/kms-1",
		"spiffe://dev.cairn.test/kms/us-east/kms-2",
		"spiffe://dev.cairn.test/kms/eu-west/kms-1",
		"spiffe://dev.cairn.test/kms/eu-west/kms-2",
		"spiffe://dev.cairn.test/officer/global/officer-1",
		"spiffe://dev.cairn.test/officer/global/officer-2",
		"spiffe://dev.cairn.test/officer/global/officer-3",
		"spiffe://dev.cairn.test/officer/global/officer-4",
		"spiffe://dev.cairn.test/officer/global/officer-5",
		"spiffe://dev.cairn.test/regionctl/global/regionctl",
		"spiffe://dev.cairn.test/client/us-east/demo",
		"spiffe://dev.cairn.test/client/eu-west/demo",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("DefaultPlan(%s).IDs() mismatch (-want +got):\n%s", td, diff)
	}
}

func TestDefaultPlanFresh(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	a := devca.DefaultPlan(td)
	a.Regions[0] = "changed"
	if got := devca.DefaultPlan(td).Regions[0]; got != "us-east" {
		t.Errorf("DefaultPlan(%s).Regions[0] after editing an earlier result = %q, want %q", td, got, "us-east")
	}
}

func TestPlanValidate(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	edit := func(f func(*devca.Plan)) devca.Plan {
		p := devca.DefaultPlan(td)
		f(&p)
		return p
	}
	tests := []struct {
		name    string
		plan    devca.Plan
		wantErr bool
	}{
		{"default", devca.DefaultPlan(td), false},
		{"one region", edit(func(p *devca.Plan) { p.Regions = []string{"ap-south-1"} }), false},
		{"all minimums", edit(func(p *devca.Plan) { p.Distributors, p.RootKMS, p.KMSPerRegion, p.Officers = 1, 1, 1, 1 }), false},
		{"all maximums", edit(func(p *devca.Plan) { p.Distributors, p.RootKMS, p.KMSPerRegion, p.Officers = 100, 100, 100, 100 }), false},
		{"region of 63 characters", edit(func(p *devca.Plan) { p.Regions = []string{strings.Repeat("a", 63)} }), false},
		{"zero trust domain", edit(func(p *devca.Plan) { p.TrustDomain = spiffeid.TrustDomain{} }), true},
		{"nil regions", edit(func(p *devca.Plan) { p.Regions = nil }), true},
		{"empty region", edit(func(p *devca.Plan) { p.Regions = []string{"us-east", ""} }), true},
		{"region global", edit(func(p *devca.Plan) { p.Regions = []string{"global"} }), true},
		{"duplicate region", edit(func(p *devca.Plan) { p.Regions = []string{"us-east", "eu-west", "us-east"} }), true},
		{"upper-case region", edit(func(p *devca.Plan) { p.Regions = []string{"US-East"} }), true},
		{"region with underscore", edit(func(p *devca.Plan) { p.Regions = []string{"us_east"} }), true},
		{"region with dot", edit(func(p *devca.Plan) { p.Regions = []string{"us.east"} }), true},
		{"region with slash", edit(func(p *devca.Plan) { p.Regions = []string{"us/east"} }), true},
		{"region ..", edit(func(p *devca.Plan) { p.Regions = []string{".."} }), true},
		{"region with space", edit(func(p *devca.Plan) { p.Regions = []string{"us east"} }), true},
		{"region of 64 characters", edit(func(p *devca.Plan) { p.Regions = []string{strings.Repeat("a", 64)} }), true},
		{"101 regions", edit(func(p *devca.Plan) { p.Regions = manyRegions(101) }), true},
		{"100 regions", edit(func(p *devca.Plan) { p.Regions = manyRegions(100) }), false},
		{"zero distributors", edit(func(p *devca.Plan) { p.Distributors = 0 }), true},
		{"negative root KMS", edit(func(p *devca.Plan) { p.RootKMS = -1 }), true},
		{"zero KMS per region", edit(func(p *devca.Plan) { p.KMSPerRegion = 0 }), true},
		{"zero officers", edit(func(p *devca.Plan) { p.Officers = 0 }), true},
		{"101 distributors", edit(func(p *devca.Plan) { p.Distributors = 101 }), true},
		{"101 root KMS", edit(func(p *devca.Plan) { p.RootKMS = 101 }), true},
		{"101 KMS per region", edit(func(p *devca.Plan) { p.KMSPerRegion = 101 }), true},
		{"101 officers", edit(func(p *devca.Plan) { p.Officers = 101 }), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.plan.Validate()
			if (err != nil) != tt.wantErr {
				t.Errorf("%+v.Validate() = %v, want error %v", tt.plan, err, tt.wantErr)
			}
			if err != nil && !strings.HasPrefix(err.Error(), "devca: ") {
				t.Errorf("%+v.Validate() = %q, want a \"devca: \" prefix", tt.plan, err)
			}
		})
	}
}

func manyRegions(n int) []string {
	r := make([]string, n)
	for i := range r {
		r[i] = fmt.Sprintf("r%d", i)
	}
	return r
}

func TestPlanIDs(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	tests := []struct {
		name string
		plan devca.Plan
		want int
	}{
		{"default", devca.DefaultPlan(td), 18},
		{"minimal", devca.Plan{TrustDomain: td, Regions: []string{"local"}, Distributors: 1, RootKMS: 1, KMSPerRegion: 1, Officers: 1}, 6},
		{"three regions", devca.Plan{TrustDomain: td, Regions: []string{"a", "b", "c"}, Distributors: 2, RootKMS: 5, KMSPerRegion: 3, Officers: 7}, 2 + 5 + 3*3 + 7 + 1 + 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ids := tt.plan.IDs()
			if len(ids) != tt.want {
				t.Errorf("%+v.IDs() has %d IDs, want %d", tt.plan, len(ids), tt.want)
			}
			seen := map[spiffeid.ID]bool{}
			for _, id := range ids {
				if seen[id] {
					t.Errorf("%+v.IDs() lists %s twice", tt.plan, id)
				}
				seen[id] = true
				if !id.MemberOf(td) {
					t.Errorf("%+v.IDs() has %s, want members of %s only", tt.plan, id, td)
				}
				if segs := strings.Split(id.Path(), "/"); len(segs) != 4 {
					t.Errorf("%+v.IDs() has %s with %d path segments, want 3", tt.plan, id, len(segs)-1)
				}
			}
			if again := tt.plan.IDs(); !cmp.Equal(ids, again, cmpOpts) {
				t.Errorf("%+v.IDs() = %v then %v, want the same order", tt.plan, ids, again)
			}
		})
	}
}

func TestPlanIDsPanicsOnInvalidPlan(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Errorf("Plan{}.IDs() did not panic, want a panic")
		}
	}()
	devca.Plan{}.IDs()
}

func TestLeafPaths(t *testing.T) {
	td := mustTD(t, "dev.cairn.test")
	dir := filepath.Join("out", "certs")
	tests := []struct {
		id       spiffeid.ID
		wantCert string
		wantKey  string
	}{
		{
			mustID(t, td, "kms", "us-east", "kms-1"),
			filepath.Join(dir, "kms", "us-east", "kms-1", "cert.pem"),
			filepath.Join(dir, "kms", "us-east", "kms-1", "key.pem"),
		},
		{
			mustID(t, td, "regionctl", "global", "regionctl"),
			filepath.Join(dir, "regionctl", "global", "regionctl", "cert.pem"),
			filepath.Join(dir, "regionctl", "global", "regionctl", "key.pem"),
		},
	}
	for _, tt := range tests {
		t.Run(tt.id.String(), func(t *testing.T) {
			gotCert, gotKey := devca.LeafPaths(dir, tt.id)
			if gotCert != tt.wantCert || gotKey != tt.wantKey {
				t.Errorf("LeafPaths(%q, %s) = %q, %q, want %q, %q", dir, tt.id, gotCert, gotKey, tt.wantCert, tt.wantKey)
			}
		})
	}
}
