package rollout_test

import (
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cairnkms/cairn/regionctl/rollout"
)

func change(regions ...string) rollout.Change {
	c := rollout.Change{By: "alice", Why: "rotate"}
	for _, r := range regions {
		c.Bundles = append(c.Bundles, newRef(r))
	}
	return c
}

// stagesOf is a plan's stages as region → servers, one map a stage.
func stagesOf(p rollout.Plan) []map[string][]string {
	var out []map[string][]string
	for _, st := range p.Stages {
		m := map[string][]string{}
		for _, t := range st.Targets {
			m[t.Region] = t.Servers
		}
		out = append(out, m)
	}
	return out
}

func TestNewPlan(t *testing.T) {
	fleet := map[string][]string{
		"us-east":  {"u1", "u2", "u3"},
		"eu-west":  {"e1", "e2"},
		"ap-south": {"a1"},
		"sa-east":  {"s1"},
		"idle":     {"i1"}, // in the fleet, not in the change: never touched
	}
	tests := []struct {
		name   string
		change rollout.Change
		fleet  map[string][]string
		opts   rollout.Options
		want   []map[string][]string
		// wantErr is the problems of the *PlanError, when refused.
		wantErr []string
	}{
		{
			name:   "defaults: regions sorted, canary 1, waves of 1",
			change: change("us-east", "eu-west"), fleet: fleet,
			want: []map[string][]string{{"eu-west": {"e1"}}, {"eu-west": {"e2"}}, {"us-east": {"u1", "u2", "u3"}}},
		},
		{
			name:   "explicit order, canary 2, waves of 2",
			change: change("us-east", "eu-west", "ap-south", "sa-east"), fleet: fleet,
			opts: rollout.Options{Regions: []string{"us-east", "eu-west", "ap-south", "sa-east"}, Canary: 2, WaveSize: 2},
			want: []map[string][]string{{"us-east": {"u1", "u2"}}, {"us-east": {"u3"}},
				{"eu-west": {"e1", "e2"}, "ap-south": {"a1"}}, {"sa-east": {"s1"}}},
		},
		{
			name:   "one-server first region has no rest-of-region stage",
			change: change("ap-south", "eu-west"), fleet: fleet,
			opts: rollout.Options{Regions: []string{"ap-south", "eu-west"}},
			want: []map[string][]string{{"ap-south": {"a1"}}, {"eu-west": {"e1", "e2"}}},
		},
		{
			name:   "one region",
			change: change("us-east"), fleet: fleet,
			want: []map[string][]string{{"us-east": {"u1"}}, {"us-east": {"u2", "u3"}}},
		},
		{
			name:   "all regions at once",
			change: change("us-east", "eu-west"), fleet: fleet, opts: rollout.Options{WaveSize: 2},
			wantErr: []string{"wave size 2 would roll out to all 2 regions at once; never all regions at once"},
		},
		{
			name:   "a wave larger than the fleet",
			change: change("us-east", "eu-west", "sa-east"), fleet: fleet, opts: rollout.Options{WaveSize: 10},
			wantErr: []string{"wave size 10 would roll out to all 3 regions at once; never all regions at once"},
		},
		{
			name: "empty change and fleet", change: rollout.Change{}, fleet: nil,
			wantErr: []string{"who started the rollout is missing", "why is missing", "the change has no bundle"},
		},
		{
			name: "region without servers", change: change("us-east", "mars"), fleet: fleet,
			wantErr: []string{"region mars has no servers in the fleet"},
		},
		{
			name: "region without a bundle", change: change("us-east"), fleet: fleet,
			opts:    rollout.Options{Regions: []string{"us-east", "eu-west"}},
			wantErr: []string{"region eu-west has no bundle"},
		},
		{
			name: "bundle for a region missing from the order", change: change("us-east", "eu-west"), fleet: fleet,
			opts:    rollout.Options{Regions: []string{"us-east"}},
			wantErr: []string{"the bundle for region eu-west is for a region missing from the region order"},
		},
		{
			name: "region listed twice", change: change("us-east", "eu-west"), fleet: fleet,
			opts:    rollout.Options{Regions: []string{"us-east", "eu-west", "us-east"}},
			wantErr: []string{"region us-east is listed twice in the region order"},
		},
		{
			name: "two bundles for a region", change: rollout.Change{By: "a", Why: "b", Bundles: []rollout.BundleRef{newRef("us-east"), newRef("us-east")}}, fleet: fleet,
			wantErr: []string{"two bundles for region us-east"},
		},
		{
			name: "malformed bundles",
			change: rollout.Change{By: "a", Why: "b", Bundles: []rollout.BundleRef{
				{Region: "us-east", Serial: 0, SHA256: sum("x")},
				{Region: "eu-west", Serial: 1, SHA256: "ABC"},
				{Region: "Bad Region", Serial: 1, SHA256: sum("y")},
			}},
			fleet: fleet,
			wantErr: []string{
				`bundle for region "us-east": serial 0`,
				`bundle for region "eu-west": sha256 "ABC" is not 64 lowercase hex digits`,
				`bundle: region: invalid name: "Bad Region" must match ^[a-z][a-z0-9-]{0,62}$`,
			},
		},
		{
			name: "duplicate servers", change: change("us-east", "eu-west"),
			fleet:   map[string][]string{"us-east": {"x1", "x1", "x2"}, "eu-west": {"x2", ""}},
			opts:    rollout.Options{Regions: []string{"us-east", "eu-west"}},
			wantErr: []string{"server x1 is listed twice in region us-east", "server x2 is listed in regions us-east and eu-west", "region eu-west has a server with an empty name"},
		},
		{
			name: "canary as large as the first region", change: change("us-east", "eu-west"), fleet: fleet,
			opts:    rollout.Options{Regions: []string{"us-east", "eu-west"}, Canary: 3},
			wantErr: []string{"canary count 3 would be the whole first region us-east (3 servers); the canary must be smaller"},
		},
		{
			name: "canary larger than a one-server region", change: change("sa-east"), fleet: fleet, opts: rollout.Options{Canary: 2},
			wantErr: []string{"canary count 2 exceeds the 1 server(s) of the first region sa-east"},
		},
		{
			name: "negative knobs", change: change("us-east"), fleet: fleet,
			opts:    rollout.Options{Canary: -1, WaveSize: -1, CanaryBake: -time.Second, Thresholds: rollout.Thresholds{MaxP99Ratio: 0.5}},
			wantErr: []string{"canary bake -1s is negative", "canary count -1 is negative", "wave size -1 is negative", "max p99 ratio 0.5 must be at least 1"},
		},
		{
			name: "keyset for a region outside the plan",
			change: func() rollout.Change {
				c := change("us-east")
				c.Keysets = []rollout.KeysetScope{{Name: "demo/notes", Regions: []string{"us-east", "eu-west"}}}
				return c
			}(),
			fleet:   fleet,
			wantErr: []string{"keyset demo/notes to publish serves region eu-west, which the rollout does not cover"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := rollout.NewPlan(tt.change, tt.fleet, tt.opts)
			if tt.wantErr != nil {
				var pe *rollout.PlanError
				if !errors.As(err, &pe) || !errors.Is(err, rollout.ErrInvalidPlan) {
					t.Fatalf("NewPlan() = %v, want a *PlanError matching ErrInvalidPlan", err)
				}
				if diff := cmp.Diff(tt.wantErr, pe.Problems); diff != "" {
					t.Errorf("NewPlan() problems (-want +got):\n%s", diff)
				}
				return
			}
			if err != nil {
				t.Fatalf("NewPlan() = %v", err)
			}
			if diff := cmp.Diff(tt.want, stagesOf(p)); diff != "" {
				t.Errorf("NewPlan() stages (-want +got):\n%s", diff)
			}
			// Never every region in one stage once there are two.
			for i, st := range p.Stages {
				if len(p.Regions) >= 2 && len(st.Regions()) == len(p.Regions) {
					t.Errorf("stage %d covers every region: %v", i+1, st.Regions())
				}
			}
		})
	}
}

func TestNewPlanDefaults(t *testing.T) {
	p, err := rollout.NewPlan(change("us-east", "eu-west"), map[string][]string{"us-east": {"u1", "u2"}, "eu-west": {"e1"}},
		rollout.Options{Regions: []string{"us-east", "eu-west"}})
	if err != nil {
		t.Fatal(err)
	}
	var bakes []time.Duration
	for _, st := range p.Stages {
		bakes = append(bakes, st.Bake)
	}
	if want := []time.Duration{rollout.DefaultCanaryBake, rollout.DefaultRegionBake, rollout.DefaultWaveBake}; !cmp.Equal(bakes, want) {
		t.Errorf("bakes = %v, want %v", bakes, want)
	}
	want := rollout.Thresholds{MaxErrorRateIncrease: rollout.DefaultMaxErrorRateIncrease, MaxP99Ratio: rollout.DefaultMaxP99Ratio, P99Floor: rollout.DefaultP99Floor}
	if p.Thresholds != want {
		t.Errorf("thresholds = %+v, want %+v", p.Thresholds, want)
	}
}
