package monitoring

import (
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"text/template"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"go.yaml.in/yaml/v3"
)

// What the servers export. A metric or label not listed here is a typo or
// a metric nobody exports, and the check refuses it.

const (
	jobKMS         = "cairn-kms"
	jobRootKMS     = "cairn-rootkms"
	jobDistributor = "cairn-distributor"
)

// knownJobs are the scrape jobs of prometheus.yml. Only cairn-kms targets
// carry the region target label.
var knownJobs = []string{jobKMS, jobRootKMS, jobDistributor}

type metricType int

const (
	counter metricType = iota
	gauge
	histogram
)

// family is a metric family a Cairn server exports.
type family struct {
	typ metricType
	// job is the only job exporting it ("": every job: the Go and process
	// collectors, cairn_build_info, Prometheus's up).
	job string
	// labels are the family's own labels (job, instance and region are
	// target labels; a histogram's le is added for _bucket).
	labels []string
}

var families = map[string]family{
	// Prometheus, per target.
	"up": {gauge, "", nil},
	// internal/ops: the Go and process collectors and the build info.
	"go_goroutines":                 {gauge, "", nil},
	"go_memstats_heap_inuse_bytes":  {gauge, "", nil},
	"go_memstats_alloc_bytes":       {gauge, "", nil},
	"process_resident_memory_bytes": {gauge, "", nil},
	"process_cpu_seconds_total":     {counter, "", nil},
	"process_start_time_seconds":    {gauge, "", nil},
	"cairn_build_info":              {gauge, "", []string{"binary", "version", "goversion"}},
	// kms.
	"cairn_kms_requests_total":                   {counter, jobKMS, []string{"op", "code"}},
	"cairn_kms_request_duration_seconds":         {histogram, jobKMS, []string{"op"}},
	"cairn_kms_keysets":                          {gauge, jobKMS, nil},
	"cairn_kms_bundle_serial":                    {gauge, jobKMS, nil},
	"cairn_kms_ready":                            {gauge, jobKMS, nil},
	"cairn_kms_usage_history_lost":               {gauge, jobKMS, nil},
	"cairn_kms_bundle_applied_timestamp_seconds": {gauge, jobKMS, nil},
	"cairn_kms_bundle_created_timestamp_seconds": {gauge, jobKMS, nil},
	"cairn_kms_bundle_expired":                   {gauge, jobKMS, nil},
	"cairn_kms_keyset_requests_total":            {counter, jobKMS, []string{"keyset", "op", "outcome"}},
	// rootkms.
	"cairn_rootkms_raft_leader":               {gauge, jobRootKMS, nil},
	"cairn_rootkms_raft_has_leader":           {gauge, jobRootKMS, nil},
	"cairn_rootkms_raft_term":                 {gauge, jobRootKMS, nil},
	"cairn_rootkms_raft_commit_index":         {gauge, jobRootKMS, nil},
	"cairn_rootkms_raft_applied_index":        {gauge, jobRootKMS, nil},
	"cairn_rootkms_raft_last_contact_seconds": {gauge, jobRootKMS, nil},
	"cairn_rootkms_apply_duration_seconds":    {histogram, jobRootKMS, nil},
	"cairn_rootkms_snapshot_age_seconds":      {gauge, jobRootKMS, nil},
	"cairn_rootkms_regions":                   {gauge, jobRootKMS, nil},
	"cairn_rootkms_keysets":                   {gauge, jobRootKMS, nil},
	"cairn_rootkms_ready":                     {gauge, jobRootKMS, nil},
	// distributor.
	"cairn_distributor_sealed":                   {gauge, jobDistributor, nil},
	"cairn_distributor_ready":                    {gauge, jobDistributor, nil},
	"cairn_distributor_ceremony_shares_received": {gauge, jobDistributor, nil},
	"cairn_distributor_ceremony_shares_required": {gauge, jobDistributor, nil},
	"cairn_distributor_ceremonies_open":          {gauge, jobDistributor, nil},
	"cairn_distributor_root_key_handouts_total":  {counter, jobDistributor, []string{"to"}},
	"cairn_distributor_root_key_refusals_total":  {counter, jobDistributor, []string{"reason"}},
}

// labelValues are the values of the labels whose values are a closed set.
var labelValues = map[string][]string{
	"job": knownJobs,
	"op": {"encrypt", "decrypt", "encrypt_batch", "decrypt_batch", "generate_data_key", "rewrap",
		"apply_bundle", "get_status", "probe"},
	"code": {"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
		"PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
		"Internal", "Unavailable", "DataLoss", "Unauthenticated"},
	"outcome": {"ok", "denied", "error"},
}

// series resolves a series name to its family: NAME, or NAME_bucket,
// NAME_sum, NAME_count of a histogram.
func series(name string) (family, bool, error) {
	if f, ok := families[name]; ok && f.typ != histogram {
		return f, false, nil
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if f, ok := families[strings.TrimSuffix(name, suffix)]; ok && strings.HasSuffix(name, suffix) && f.typ == histogram {
			return f, suffix == "_bucket", nil
		}
	}
	if f, ok := families[name]; ok && f.typ == histogram {
		return family{}, false, fmt.Errorf("%s is a histogram: select %s_bucket, _sum or _count", name, name)
	}
	return family{}, false, fmt.Errorf("unknown metric %s", name)
}

// exprCheck checks a PromQL expression against the catalogue above.
type exprCheck struct {
	// minRange is the shortest range selector allowed (4 scrape intervals).
	minRange time.Duration
	// vars are the dashboard variables allowed in matchers ("$region"
	// must be in region=~"$region"), nil for alert rules.
	vars map[string]bool
}

var promParser = parser.NewParser(parser.Options{})

// varSentinel marks where a dashboard variable was in an expression.
const varSentinel = "__var_"

var grafanaVarRE = regexp.MustCompile(`\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}|([A-Za-z_][A-Za-z0-9_]*))`)

// expand replaces Grafana's variables: the interval macros by durations,
// the dashboard's own variables by a sentinel that check then finds in
// matchers.
func (c exprCheck) expand(expr string) (string, error) {
	var bad []string
	out := grafanaVarRE.ReplaceAllStringFunc(expr, func(m string) string {
		sub := grafanaVarRE.FindStringSubmatch(m)
		name := sub[1] + sub[2]
		switch name {
		case "__rate_interval", "__interval":
			return "1m"
		case "__range":
			return "6h"
		}
		if c.vars[name] {
			return varSentinel + name + "__"
		}
		bad = append(bad, m)
		return m
	})
	if bad != nil {
		return "", fmt.Errorf("unknown variable %s", strings.Join(bad, ", "))
	}
	return out, nil
}

// check parses expr with Prometheus's parser and checks every selector:
// known metric, job matcher consistent with the metric's job, only labels
// the series carry, only known values of closed label sets, ranges of at
// least minRange, dashboard variables only in LABEL=~"$LABEL" matchers.
// It returns the parsed expression.
func (c exprCheck) check(expr string) (parser.Expr, error) {
	expanded, err := c.expand(expr)
	if err != nil {
		return nil, err
	}
	e, err := promParser.ParseExpr(expanded)
	if err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	var problems []error
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		switch n := n.(type) {
		case *parser.VectorSelector:
			if err := c.checkSelector(n); err != nil {
				problems = append(problems, err)
			}
		case *parser.MatrixSelector:
			if n.Range < c.minRange {
				problems = append(problems, fmt.Errorf("range [%s] of %s: want at least %s (4 scrape intervals)",
					model.Duration(n.Range), n.VectorSelector, model.Duration(c.minRange)))
			}
		case *parser.SubqueryExpr:
			problems = append(problems, fmt.Errorf("subquery %s: not used here; write a plain range", n))
		}
		return nil
	})
	if len(problems) > 0 {
		return nil, problems[0]
	}
	if _, err := outLabels(e); err != nil {
		return nil, err
	}
	return e, nil
}

// selectorJobs returns the known jobs a selector's job matchers match.
func selectorJobs(vs *parser.VectorSelector) ([]string, error) {
	var jobs []string
	found := false
	for _, j := range knownJobs {
		ok := true
		for _, m := range vs.LabelMatchers {
			if m.Name == "job" {
				found = true
				ok = ok && m.Matches(j)
			}
		}
		if ok {
			jobs = append(jobs, j)
		}
	}
	if !found {
		return nil, fmt.Errorf("%s: no job matcher (select %v explicitly)", vs, knownJobs)
	}
	if len(jobs) == 0 {
		return nil, fmt.Errorf("%s: matches none of the jobs %v", vs, knownJobs)
	}
	return jobs, nil
}

// selectorLabels returns the labels a selector's series carry.
func selectorLabels(vs *parser.VectorSelector) (map[string]bool, error) {
	if vs.Name == "" {
		return nil, fmt.Errorf("%s selects no metric by name", vs)
	}
	f, bucket, err := series(vs.Name)
	if err != nil {
		return nil, err
	}
	jobs, err := selectorJobs(vs)
	if err != nil {
		return nil, err
	}
	if f.job != "" && !slices.Equal(jobs, []string{f.job}) {
		return nil, fmt.Errorf("%s: %s is exported by job %s only, the selector matches jobs %v", vs, vs.Name, f.job, jobs)
	}
	ls := map[string]bool{"job": true, "instance": true}
	for _, l := range f.labels {
		ls[l] = true
	}
	if bucket {
		ls["le"] = true
	}
	if slices.Equal(jobs, []string{jobKMS}) {
		ls["region"] = true
	}
	return ls, nil
}

var alternationRE = regexp.MustCompile(`^[A-Za-z0-9_-]+(\|[A-Za-z0-9_-]+)*$`)

func (c exprCheck) checkSelector(vs *parser.VectorSelector) error {
	ls, err := selectorLabels(vs)
	if err != nil {
		return err
	}
	used := map[string]bool{}
	for _, m := range vs.LabelMatchers {
		if m.Name == labels.MetricName {
			continue
		}
		used[m.Name] = true
		if !ls[m.Name] {
			return fmt.Errorf("%s: label %q is not on %s (it has %v)", vs, m.Name, vs.Name, slices.Sorted(maps.Keys(ls)))
		}
		if strings.Contains(m.Value, varSentinel) {
			if m.Value != varSentinel+m.Name+"__" || m.Type != labels.MatchRegexp || !c.vars[m.Name] {
				return fmt.Errorf("%s: a dashboard variable may only appear as %s=~\"$%s\"", vs, m.Name, m.Name)
			}
			continue
		}
		known, closed := labelValues[m.Name]
		if !closed {
			continue
		}
		if m.Type == labels.MatchRegexp || m.Type == labels.MatchNotRegexp {
			if alternationRE.MatchString(m.Value) {
				for _, alt := range strings.Split(m.Value, "|") {
					if !slices.Contains(known, alt) {
						return fmt.Errorf("%s: %s value %q is not one of %v", vs, m.Name, alt, known)
					}
				}
			}
		} else if !slices.Contains(known, m.Value) {
			return fmt.Errorf("%s: %s value %q is not one of %v", vs, m.Name, m.Value, known)
		}
		if (m.Type == labels.MatchEqual || m.Type == labels.MatchRegexp) && !slices.ContainsFunc(known, m.Matches) {
			return fmt.Errorf("%s: matcher %s matches no %s value of %v", vs, m, m.Name, known)
		}
	}
	if c.vars != nil {
		// Every dashboard query follows the dashboard's filters.
		for _, v := range []string{"region", "instance"} {
			if ls[v] && c.vars[v] && !used[v] {
				return fmt.Errorf("%s: no %s=~\"$%s\" matcher: the panel ignores the %s filter", vs, v, v, v)
			}
		}
	}
	return nil
}

func setOf(xs ...string) map[string]bool {
	s := map[string]bool{}
	for _, x := range xs {
		s[x] = true
	}
	return s
}

func intersect(a, b map[string]bool) map[string]bool {
	out := map[string]bool{}
	for k := range a {
		if b[k] {
			out[k] = true
		}
	}
	return out
}

// outLabels returns the labels every series of e's result carries (the
// metric name aside), following Prometheus's evaluation rules, and refuses
// grouping by or matching on a label that is not there.
func outLabels(e parser.Expr) (map[string]bool, error) {
	switch n := e.(type) {
	case *parser.VectorSelector:
		return selectorLabels(n)
	case *parser.MatrixSelector:
		return outLabels(n.VectorSelector)
	case *parser.ParenExpr:
		return outLabels(n.Expr)
	case *parser.UnaryExpr:
		return outLabels(n.Expr)
	case *parser.SubqueryExpr:
		return outLabels(n.Expr)
	case *parser.StepInvariantExpr:
		return outLabels(n.Expr)
	case *parser.NumberLiteral, *parser.StringLiteral:
		return map[string]bool{}, nil
	case *parser.AggregateExpr:
		in, err := outLabels(n.Expr)
		if err != nil {
			return nil, err
		}
		for _, g := range n.Grouping {
			if !in[g] {
				return nil, fmt.Errorf("%s: grouping label %q is not on %s", n, g, n.Expr)
			}
		}
		switch {
		case n.Op == parser.TOPK || n.Op == parser.BOTTOMK || n.Op == parser.LIMITK || n.Op == parser.LIMIT_RATIO:
			return in, nil
		case n.Without:
			out := maps.Clone(in)
			for _, g := range n.Grouping {
				delete(out, g)
			}
			return out, nil
		case n.Op == parser.COUNT_VALUES:
			out := setOf(n.Grouping...)
			if s, ok := n.Param.(*parser.StringLiteral); ok {
				out[s.Val] = true
			}
			return out, nil
		}
		return setOf(n.Grouping...), nil
	case *parser.Call:
		switch n.Func.Name {
		case "absent", "absent_over_time":
			out := map[string]bool{}
			parser.Inspect(n.Args[0], func(c parser.Node, _ []parser.Node) error {
				if vs, ok := c.(*parser.VectorSelector); ok {
					for _, m := range vs.LabelMatchers {
						if m.Type == labels.MatchEqual && m.Name != labels.MetricName {
							out[m.Name] = true
						}
					}
				}
				return nil
			})
			return out, nil
		case "histogram_quantile":
			in, err := outLabels(n.Args[1])
			if err != nil {
				return nil, err
			}
			if !in["le"] {
				return nil, fmt.Errorf("%s: the histogram argument has no le label (keep it in by (..., le))", n)
			}
			delete(in, "le")
			return in, nil
		case "label_replace", "label_join":
			in, err := outLabels(n.Args[0])
			if err != nil {
				return nil, err
			}
			if s, ok := n.Args[1].(*parser.StringLiteral); ok {
				in[s.Val] = true
			}
			return in, nil
		}
		for _, a := range n.Args {
			if t := a.Type(); t == parser.ValueTypeVector || t == parser.ValueTypeMatrix {
				return outLabels(a)
			}
		}
		return map[string]bool{}, nil
	case *parser.BinaryExpr:
		lt, rt := n.LHS.Type(), n.RHS.Type()
		l, err := outLabels(n.LHS)
		if err != nil {
			return nil, err
		}
		r, err := outLabels(n.RHS)
		if err != nil {
			return nil, err
		}
		switch {
		case lt == parser.ValueTypeScalar && rt == parser.ValueTypeScalar:
			return map[string]bool{}, nil
		case lt == parser.ValueTypeScalar:
			return r, nil
		case rt == parser.ValueTypeScalar:
			return l, nil
		}
		vm := n.VectorMatching
		if vm.On {
			for _, m := range vm.MatchingLabels {
				if !l[m] || !r[m] {
					return nil, fmt.Errorf("%s: on (%s): %q is not on both sides", n, strings.Join(vm.MatchingLabels, ", "), m)
				}
			}
		}
		switch n.Op {
		case parser.LAND, parser.LUNLESS:
			return l, nil
		case parser.LOR:
			return intersect(l, r), nil
		}
		switch vm.Card {
		case parser.CardManyToOne:
			out := maps.Clone(l)
			for _, i := range vm.Include {
				if !r[i] {
					return nil, fmt.Errorf("%s: group_left label %q is not on the right side", n, i)
				}
				out[i] = true
			}
			return out, nil
		case parser.CardOneToMany:
			out := maps.Clone(r)
			for _, i := range vm.Include {
				if !l[i] {
					return nil, fmt.Errorf("%s: group_right label %q is not on the left side", n, i)
				}
				out[i] = true
			}
			return out, nil
		}
		if vm.On {
			return intersect(l, setOf(vm.MatchingLabels...)), nil
		}
		out := maps.Clone(l)
		for _, m := range vm.MatchingLabels {
			delete(out, m)
		}
		return out, nil
	}
	return nil, fmt.Errorf("%s: unexpected node %T", e, e)
}

// Prometheus's template functions the annotations may use (the subset
// Cairn uses; the outputs only need to be strings here).
var templateFuncs = template.FuncMap{
	"humanize":           func(v float64) string { return strconv.FormatFloat(v, 'g', 4, 64) },
	"humanize1024":       func(v float64) string { return strconv.FormatFloat(v/1024, 'g', 4, 64) + "Ki" },
	"humanizeDuration":   func(v float64) string { return time.Duration(v * float64(time.Second)).String() },
	"humanizePercentage": func(v float64) string { return strconv.FormatFloat(v*100, 'g', 4, 64) + "%" },
}

// renderAnnotation expands an annotation as Prometheus does, with every
// label the expression keeps set; a label it drops is an error.
func renderAnnotation(text string, ls map[string]bool) (string, error) {
	const header = "{{$labels := .Labels}}{{$externalLabels := .ExternalLabels}}{{$externalURL := .ExternalURL}}{{$value := .Value}}"
	t, err := template.New("annotation").Option("missingkey=error").Funcs(templateFuncs).Parse(header + text)
	if err != nil {
		return "", fmt.Errorf("template: %w", err)
	}
	data := struct {
		Labels, ExternalLabels map[string]string
		ExternalURL            string
		Value                  float64
	}{Labels: map[string]string{}, ExternalLabels: map[string]string{}, Value: 0.5}
	for l := range ls {
		data.Labels[l] = "L_" + l
	}
	var b strings.Builder
	if err := t.Execute(&b, data); err != nil {
		return "", fmt.Errorf("template: %w (the expression keeps %v)", err, slices.Sorted(maps.Keys(ls)))
	}
	return b.String(), nil
}

// scrapeInterval is prometheus.yml's global scrape_interval.
const scrapeInterval = 15 * time.Second

var ruleCheck = exprCheck{minRange: 4 * scrapeInterval}

// checkRule checks what parseRules cannot: the PromQL, its metrics and
// labels, and the annotations against the labels the expression keeps.
func checkRule(r Rule) error {
	e, err := ruleCheck.check(r.Expr)
	if err != nil {
		return fmt.Errorf("%s: %w", r.Alert, err)
	}
	if e.Type() != parser.ValueTypeVector {
		return fmt.Errorf("%s: expr is a %s, want an instant vector", r.Alert, e.Type())
	}
	ls, err := outLabels(e)
	if err != nil {
		return fmt.Errorf("%s: %w", r.Alert, err)
	}
	for _, k := range slices.Sorted(maps.Keys(r.Annotations)) {
		out, err := renderAnnotation(r.Annotations[k], ls)
		if err != nil {
			return fmt.Errorf("%s: annotation %s: %w", r.Alert, k, err)
		}
		if strings.Contains(out, "<no value>") {
			return fmt.Errorf("%s: annotation %s renders %q", r.Alert, k, out)
		}
	}
	return nil
}

// checkRules is the whole check of a rule file.
func checkRules(data []byte) ([]Rule, error) {
	rules, err := parseRules(data)
	if err != nil {
		return nil, err
	}
	for _, r := range rules {
		if err := checkRule(r); err != nil {
			return nil, err
		}
	}
	return rules, nil
}

var legendRE = regexp.MustCompile(`\{\{\s*([^}\s]*)\s*\}\}`)

// checkDashboard is the whole check of a dashboard: parseDashboard's
// structure, then the variables' queries and every target's PromQL and
// legend.
func checkDashboard(data []byte) (*Board, error) {
	d, err := parseDashboard(data)
	if err != nil {
		return nil, err
	}
	vars := map[string]bool{}
	for _, v := range d.Variables {
		if v.Type != "query" {
			continue
		}
		sel, label, ok := LabelValuesQuery(v.Query)
		if !ok {
			return nil, fmt.Errorf("variable %s: query %q: want label_values(SELECTOR, LABEL)", v.Name, v.Query)
		}
		e, err := exprCheck{}.check(sel)
		if err != nil {
			return nil, fmt.Errorf("variable %s: %w", v.Name, err)
		}
		vs, ok := e.(*parser.VectorSelector)
		if !ok {
			return nil, fmt.Errorf("variable %s: %s is not a selector", v.Name, sel)
		}
		ls, err := selectorLabels(vs)
		if err != nil {
			return nil, fmt.Errorf("variable %s: %w", v.Name, err)
		}
		if !ls[label] {
			return nil, fmt.Errorf("variable %s: %s has no label %s", v.Name, sel, label)
		}
		vars[v.Name] = true
	}
	c := exprCheck{minRange: 4 * scrapeInterval, vars: vars}
	for _, p := range d.Panels {
		for _, t := range p.Targets {
			where := fmt.Sprintf("panel %d (%q) target %s", p.ID, p.Title, t.RefID)
			e, err := c.check(t.Expr)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
			if typ := e.Type(); typ != parser.ValueTypeVector && typ != parser.ValueTypeScalar {
				return nil, fmt.Errorf("%s: a %s; want a vector or a scalar", where, typ)
			}
			ls, err := outLabels(e)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
			for _, m := range legendRE.FindAllStringSubmatch(t.LegendFormat, -1) {
				if !ls[m[1]] {
					return nil, fmt.Errorf("%s: legend {{%s}}: not a label of the result (%v)", where, m[1], slices.Sorted(maps.Keys(ls)))
				}
			}
		}
	}
	return d, nil
}

func TestRules(t *testing.T) {
	rules, err := checkRules(rulesYAML)
	if err != nil {
		t.Fatalf("checkRules(%s) = %v", RulesFile, err)
	}
	got, err := Rules()
	if err != nil {
		t.Fatalf("Rules() = %v", err)
	}
	if diff := cmp.Diff(rules, got); diff != "" {
		t.Errorf("Rules() differs from the checked rules (-checked +Rules):\n%s", diff)
	}
	// The alerts the fleet must have (issue 12).
	want := []string{
		"CairnKMSNotReady", "CairnKMSRegionUnavailable", "CairnKMSDecryptErrorRatioHigh",
		"CairnKMSDecryptRejectionsHigh", "CairnKMSBundleStale", "CairnKMSUsageHistoryLost",
		"CairnRootKMSNoLeader", "CairnRootKMSReplicaNotReady", "CairnRootKMSApplyLatencyHigh",
		"CairnRootKMSSnapshotOverdue", "CairnDistributorSealed", "CairnDistributorAllSealed",
		"CairnDistributorLastUnsealed", "CairnTargetDown", "CairnProcessRestarting", "CairnHeapGrowing",
	}
	have := map[string]Rule{}
	for _, r := range rules {
		have[r.Alert] = r
	}
	for _, w := range want {
		if _, ok := have[w]; !ok {
			t.Errorf("Rules() has no alert %s", w)
		}
	}
	// The outages page; the rest waits for the day.
	for alert, sev := range map[string]string{
		"CairnKMSRegionUnavailable": "page", "CairnRootKMSNoLeader": "page", "CairnDistributorAllSealed": "page",
		"CairnDistributorLastUnsealed": "page", "CairnKMSDecryptErrorRatioHigh": "page",
		"CairnKMSNotReady": "ticket", "CairnKMSDecryptRejectionsHigh": "ticket", "CairnTargetDown": "ticket",
	} {
		if got := have[alert].Severity; got != sev {
			t.Errorf("severity of %s = %q, want %q", alert, got, sev)
		}
	}
}

func TestDashboard(t *testing.T) {
	d, err := checkDashboard(dashboardJSON)
	if err != nil {
		t.Fatalf("checkDashboard(%s) = %v", DashboardFile, err)
	}
	if d.SchemaVersion != 39 {
		t.Errorf("schemaVersion = %d, want 39", d.SchemaVersion)
	}
	var vars []string
	for _, v := range d.Variables {
		vars = append(vars, v.Name)
	}
	if diff := cmp.Diff([]string{"datasource", "region", "instance"}, vars); diff != "" {
		t.Errorf("variables (-want +got):\n%s", diff)
	}
	var rows []string
	queried := map[string]bool{}
	for _, p := range d.Panels {
		if p.Type == "row" {
			rows = append(rows, p.Title)
		}
		for _, tg := range p.Targets {
			ns, err := metricNames(tg.Expr)
			if err != nil {
				t.Fatalf("metricNames(%q) = %v", tg.Expr, err)
			}
			for _, n := range ns {
				queried[n] = true
			}
		}
	}
	if diff := cmp.Diff([]string{"KMS", "Root KMS", "Distributors", "Process"}, rows); diff != "" {
		t.Errorf("rows (-want +got):\n%s", diff)
	}
	// Every Cairn metric is on the dashboard.
	for name, f := range families {
		n := name
		if f.typ == histogram {
			n += "_bucket"
		}
		if strings.HasPrefix(name, "cairn_") && !queried[n] {
			t.Errorf("no panel queries %s", n)
		}
	}
	// Panels do not overlap.
	for i, a := range d.Panels {
		for _, b := range d.Panels[:i] {
			if a.X < b.X+b.W && b.X < a.X+a.W && a.Y < b.Y+b.H && b.Y < a.Y+a.H {
				t.Errorf("panels %d (%q) and %d (%q) overlap", a.ID, a.Title, b.ID, b.Title)
			}
		}
	}
}

// TestMetricNames checks MetricNames' lexer against Prometheus's parser on
// every shipped expression, and every name against the catalogue.
func TestMetricNames(t *testing.T) {
	rules, err := Rules()
	if err != nil {
		t.Fatal(err)
	}
	d, err := Dashboard()
	if err != nil {
		t.Fatal(err)
	}
	var exprs []string
	for _, r := range rules {
		exprs = append(exprs, r.Expr)
	}
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	for _, v := range d.Variables {
		if sel, _, ok := LabelValuesQuery(v.Query); ok {
			exprs = append(exprs, sel)
		}
	}
	all := map[string]bool{}
	c := exprCheck{vars: map[string]bool{"region": true, "instance": true}}
	for _, expr := range exprs {
		got, err := metricNames(expr)
		if err != nil {
			t.Fatalf("metricNames(%q) = %v", expr, err)
		}
		expanded, err := c.expand(expr)
		if err != nil {
			t.Fatal(err)
		}
		e, err := promParser.ParseExpr(expanded)
		if err != nil {
			t.Fatalf("ParseExpr(%q) = %v", expanded, err)
		}
		var want []string
		parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
			if vs, ok := n.(*parser.VectorSelector); ok {
				want = append(want, vs.Name)
			}
			return nil
		})
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("metricNames(%q) (-parser +lexer):\n%s", expr, diff)
		}
		for _, n := range want {
			all[n] = true
		}
	}
	got, err := MetricNames()
	if err != nil {
		t.Fatalf("MetricNames() = %v", err)
	}
	if diff := cmp.Diff(slices.Sorted(maps.Keys(all)), got); diff != "" {
		t.Errorf("MetricNames() (-parser +got):\n%s", diff)
	}
	for _, n := range got {
		if _, _, err := series(n); err != nil {
			t.Errorf("MetricNames(): %v", err)
		}
	}
	if !slices.Contains(got, "cairn_kms_request_duration_seconds_bucket") {
		t.Errorf("MetricNames() = %v, want histograms as NAME_bucket", got)
	}
}

func TestMetricNamesLexer(t *testing.T) {
	tests := []struct {
		expr string
		want []string
	}{
		{`up`, []string{"up"}},
		{`sum by (job, le) (rate(a_total{code!~"x|y", op="}]"}[5m] offset 1d)) > on (job) group_left (x) b`, []string{"a_total", "b"}},
		{`histogram_quantile(0.99, sum without (instance) (rate(x_bucket[$__rate_interval])))`, []string{"x_bucket"}},
		{`topk(10, count_values("v", build_info)) and ON(job) absent(m{a="b"}) unless Sum (c)`, []string{"build_info", "m", "c"}},
		{`1e+3 * 0x1F - .5 + Inf - NaN + time() + label_replace(q, "d", "$1", "s", "(.*)") # comment metric`, []string{"q"}},
		{"a:rule:rate5m{l=`x}`} / ignoring(z) b @ start()", []string{"a:rule:rate5m", "b"}},
	}
	for _, tt := range tests {
		got, err := metricNames(tt.expr)
		if err != nil {
			t.Errorf("metricNames(%q) = %v", tt.expr, err)
			continue
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("metricNames(%q) (-want +got):\n%s", tt.expr, diff)
		}
	}
	for _, bad := range []string{`a{b="c"`, `rate(a[5m)`, `a{b="c}`, `a}`} {
		if got, err := metricNames(bad); err == nil {
			t.Errorf("metricNames(%q) = %v, nil; want an error", bad, got)
		}
	}
}

// promConfig is the subset of Prometheus's configuration prometheus.yml
// uses; any other key is refused.
type promConfig struct {
	Global struct {
		ScrapeInterval     string `yaml:"scrape_interval"`
		ScrapeTimeout      string `yaml:"scrape_timeout"`
		EvaluationInterval string `yaml:"evaluation_interval"`
	} `yaml:"global"`
	RuleFiles     []string `yaml:"rule_files"`
	ScrapeConfigs []struct {
		JobName       string `yaml:"job_name"`
		MetricsPath   string `yaml:"metrics_path"`
		Scheme        string `yaml:"scheme"`
		FileSDConfigs []struct {
			Files           []string `yaml:"files"`
			RefreshInterval string   `yaml:"refresh_interval"`
		} `yaml:"file_sd_configs"`
		StaticConfigs []targetGroup `yaml:"static_configs"`
	} `yaml:"scrape_configs"`
}

type targetGroup struct {
	Targets []string          `yaml:"targets"`
	Labels  map[string]string `yaml:"labels"`
}

func decodeStrict(path string, v any) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func checkTargetGroups(job string, groups []targetGroup) error {
	for _, g := range groups {
		if len(g.Targets) == 0 {
			return fmt.Errorf("job %s: a target group without targets", job)
		}
		for _, tg := range g.Targets {
			host, port, err := net.SplitHostPort(tg)
			if err != nil || host == "" {
				return fmt.Errorf("job %s: target %q: want host:port", job, tg)
			}
			if p, err := strconv.Atoi(port); err != nil || p <= 0 || p > 65535 {
				return fmt.Errorf("job %s: target %q: bad port", job, tg)
			}
		}
		if job == jobKMS && g.Labels["region"] == "" {
			return fmt.Errorf("job %s: targets %v have no region label", job, g.Targets)
		}
	}
	return nil
}

func TestPrometheusConfig(t *testing.T) {
	var c promConfig
	if err := decodeStrict("prometheus.yml", &c); err != nil {
		t.Fatal(err)
	}
	durations := map[string]time.Duration{}
	for name, s := range map[string]string{"scrape_interval": c.Global.ScrapeInterval,
		"scrape_timeout": c.Global.ScrapeTimeout, "evaluation_interval": c.Global.EvaluationInterval} {
		d, err := model.ParseDuration(s)
		if err != nil {
			t.Fatalf("global.%s: %v", name, err)
		}
		durations[name] = time.Duration(d)
	}
	if got := durations["scrape_interval"]; got != scrapeInterval {
		t.Errorf("scrape_interval = %s, want %s (the rules' shortest range is 4 of them)", got, scrapeInterval)
	}
	if durations["scrape_timeout"] > durations["scrape_interval"] {
		t.Errorf("scrape_timeout %s > scrape_interval %s", durations["scrape_timeout"], durations["scrape_interval"])
	}
	if diff := cmp.Diff([]string{RulesFile}, c.RuleFiles); diff != "" {
		t.Errorf("rule_files (-want +got):\n%s", diff)
	}
	var jobs []string
	for _, sc := range c.ScrapeConfigs {
		jobs = append(jobs, sc.JobName)
		if sc.MetricsPath != "/metrics" || sc.Scheme != "http" {
			t.Errorf("job %s: %s://...%s, want http and /metrics (the ops listener)", sc.JobName, sc.Scheme, sc.MetricsPath)
		}
		if len(sc.StaticConfigs) == 0 && len(sc.FileSDConfigs) == 0 {
			t.Errorf("job %s: no targets", sc.JobName)
		}
		if err := checkTargetGroups(sc.JobName, sc.StaticConfigs); err != nil {
			t.Error(err)
		}
		for _, fsd := range sc.FileSDConfigs {
			if _, err := model.ParseDuration(fsd.RefreshInterval); err != nil {
				t.Errorf("job %s: refresh_interval: %v", sc.JobName, err)
			}
			for _, glob := range fsd.Files {
				if _, err := filepath.Match(glob, ""); err != nil {
					t.Errorf("job %s: file_sd glob %q: %v", sc.JobName, glob, err)
				}
				// The example is what the glob is meant to match.
				example := strings.Replace(glob, "*", "us-east", 1) + ".example"
				var groups []targetGroup
				if err := decodeStrict(example, &groups); err != nil {
					t.Errorf("job %s: %v", sc.JobName, err)
				}
				if ok, _ := filepath.Match(glob, strings.TrimSuffix(example, ".example")); !ok {
					t.Errorf("job %s: %s does not match the glob %s", sc.JobName, example, glob)
				}
				if err := checkTargetGroups(sc.JobName, groups); err != nil {
					t.Error(err)
				}
			}
		}
	}
	if diff := cmp.Diff(knownJobs, jobs); diff != "" {
		t.Errorf("scrape jobs (-want +got):\n%s", diff)
	}
}

func TestReadmeListsEveryAlert(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	rules, err := Rules()
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, r := range rules {
		want = append(want, r.Alert)
	}
	var got []string
	for _, m := range regexp.MustCompile(`(?m)^### (Cairn[A-Za-z]+)`).FindAllStringSubmatch(string(readme), -1) {
		got = append(got, m[1])
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("README.md alert sections, in file order (-rules +README):\n%s", diff)
	}
}

// goodRule is a valid rule file that the cases below break one way each.
const goodRule = `groups:
  - name: g
    rules:
      - alert: CairnX
        expr: cairn_kms_ready{job="cairn-kms"} == 0
        for: 5m
        labels:
          severity: ticket
        annotations:
          summary: "{{ $labels.instance }} in {{ $labels.region }}"
          description: "value {{ $value | humanizePercentage }}"
`

// TestChecksRejectBrokenRules feeds the checks broken rules: they must
// refuse each, so the checks above are not vacuous.
func TestChecksRejectBrokenRules(t *testing.T) {
	if _, err := checkRules([]byte(goodRule)); err != nil {
		t.Fatalf("checkRules(goodRule) = %v", err)
	}
	edit := func(old, new string) string {
		if !strings.Contains(goodRule, old) {
			t.Fatalf("goodRule has no %q", old)
		}
		return strings.Replace(goodRule, old, new, 1)
	}
	expr := func(e string) string { return edit(`cairn_kms_ready{job="cairn-kms"} == 0`, e) }
	tests := []struct {
		name, file, want string
	}{
		{"bad PromQL", expr(`sum(rate(cairn_kms_ready{job="cairn-kms"}[5m])`), "parse"},
		{"unknown metric", expr(`cairn_kms_readyy{job="cairn-kms"} == 0`), "unknown metric cairn_kms_readyy"},
		{"histogram without suffix", expr(`cairn_kms_request_duration_seconds{job="cairn-kms"} > 0`), "is a histogram"},
		{"selector without a name", expr(`'{__name__="cairn_kms_ready", job="cairn-kms"} == 0'`), "no metric by name"},
		{"missing severity", edit("          severity: ticket\n", "          team: kms\n"), "no severity"},
		{"severity outside the set", edit("severity: ticket", "severity: critical"), `severity "critical"`},
		{"unknown key", edit("annotations:", "anotations:"), "anotations"},
		{"recording rule", edit("- alert: CairnX", "- record: cairn:x\n        alert: CairnX"), "record"},
		{"missing for", edit("        for: 5m\n", ""), "for: missing"},
		{"for too short", edit("for: 5m", "for: 30s"), "at least"},
		{"bad for", edit("for: 5m", "for: 5 minutes"), "for:"},
		{"missing description", edit(`          description: "value {{ $value | humanizePercentage }}"`+"\n", ""), "no description"},
		{"unknown annotation", edit("        annotations:\n", "        annotations:\n          runbook: see README\n"), `unknown "runbook"`},
		{"bad alert name", edit("alert: CairnX", "alert: kms_down"), "alert:"},
		{"duplicate alert", goodRule + goodRule[strings.Index(goodRule, "      - alert"):], "defined twice"},
		{"duplicate key", edit("for: 5m", "for: 5m\n        for: 10m"), "already defined"},
		{"empty expr", expr(`""`), "expr: missing"},
		{"no job matcher", expr(`cairn_kms_ready == 0`), "no job matcher"},
		{"metric of another job", expr(`cairn_rootkms_ready{job="cairn-kms"} == 0`), "exported by job cairn-rootkms only"},
		{"unknown job", expr(`cairn_kms_ready{job="kms"} == 0`), "matches none of the jobs"},
		{"label not on the metric", expr(`cairn_kms_ready{job="cairn-kms", op="decrypt"} == 0`), `label "op" is not on cairn_kms_ready`},
		{"unknown label value", expr(`rate(cairn_kms_requests_total{job="cairn-kms", op="Decrypt"}[5m]) > 0`), `op value "Decrypt"`},
		{"typo in an alternation", expr(`rate(cairn_kms_requests_total{job="cairn-kms", code!~"OK|Unavailble"}[5m]) > 0`), `"Unavailble"`},
		{"regex matching no value", expr(`rate(cairn_kms_requests_total{job="cairn-kms", op=~"dec.*x"}[5m]) > 0`), "matches no op value"},
		{"range too short", expr(`rate(cairn_kms_requests_total{job="cairn-kms"}[30s]) > 0`), "at least 1m"},
		{"grouping by a missing label", expr(`sum by (zone) (cairn_kms_ready{job="cairn-kms"}) == 0`), `grouping label "zone"`},
		{"on a missing label", expr(`cairn_kms_ready{job="cairn-kms"} and on (zone) cairn_kms_keysets{job="cairn-kms"}`), `"zone" is not on both sides`},
		{"quantile without le", expr(`histogram_quantile(0.9, sum by (op) (rate(cairn_kms_request_duration_seconds_bucket{job="cairn-kms"}[5m]))) > 1`), "no le label"},
		{"annotation uses a dropped label", expr(`max by (region) (cairn_kms_ready{job="cairn-kms"}) == 0`), `"instance"`},
		{"region on a job without it", expr(`cairn_rootkms_ready{job="cairn-rootkms", region="x"} == 0`), `label "region" is not on`},
		{"scalar expr", expr(`1 > bool 0`), "want an instant vector"},
		{"bad template", edit("{{ $labels.instance }} in", "{{ $labels.instance } in"), "template"},
		{"unknown template function", edit("humanizePercentage", "humanise"), "template"},
		{"dashboard variable in a rule", expr(`cairn_kms_ready{job="cairn-kms", region=~"$region"} == 0`), "unknown variable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := checkRules([]byte(tt.file))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("checkRules(%s) = %v, want an error containing %q\n%s", tt.name, err, tt.want, tt.file)
			}
		})
	}
}

// TestChecksRejectBrokenDashboards breaks the shipped dashboard one way
// each and expects checkDashboard to refuse it.
func TestChecksRejectBrokenDashboards(t *testing.T) {
	type doc = map[string]any
	load := func() doc {
		var d doc
		if err := json.Unmarshal(dashboardJSON, &d); err != nil {
			t.Fatal(err)
		}
		return d
	}
	// panel returns the first panel that is not a row.
	panel := func(d doc, n int) doc {
		for _, p := range d["panels"].([]any) {
			if p := p.(doc); p["type"] != "row" {
				if n == 0 {
					return p
				}
				n--
			}
		}
		t.Fatal("no such panel")
		return nil
	}
	target := func(d doc) doc { return panel(d, 0)["targets"].([]any)[0].(doc) }
	setExpr := func(e string) func(doc) {
		return func(d doc) { target(d)["expr"] = e }
	}
	tests := []struct {
		name   string
		break_ func(doc)
		want   string
	}{
		{"duplicate panel id", func(d doc) { panel(d, 1)["id"] = panel(d, 0)["id"] }, "id used twice"},
		{"panel without id", func(d doc) { delete(panel(d, 0), "id") }, "no id"},
		{"panel without data source", func(d doc) { delete(panel(d, 0), "datasource") }, "data source"},
		{"panel on a fixed data source", func(d doc) { panel(d, 0)["datasource"] = doc{"type": "prometheus", "uid": "P1"} }, "data source"},
		{"target on another data source", func(d doc) { target(d)["datasource"] = doc{"type": "loki", "uid": "${datasource}"} }, "data source"},
		{"panel without targets", func(d doc) { panel(d, 0)["targets"] = []any{} }, "no targets"},
		{"empty expr", setExpr("  "), "empty expr"},
		{"duplicate refId", func(d doc) {
			p := panel(d, 0)
			p["targets"] = append(p["targets"].([]any), p["targets"].([]any)[0])
		}, "refId"},
		{"bad PromQL", setExpr(`sum(cairn_kms_ready{job="cairn-kms", region=~"$region", instance=~"$instance"}`), "parse"},
		{"unknown metric", setExpr(`cairn_kms_redy{job="cairn-kms", region=~"$region", instance=~"$instance"}`), "unknown metric"},
		{"unknown variable", setExpr(`cairn_kms_ready{job="cairn-kms", region=~"$cluster", instance=~"$instance"}`), "unknown variable $cluster"},
		{"variable in an equality", setExpr(`cairn_kms_ready{job="cairn-kms", region="$region", instance=~"$instance"}`), "may only appear"},
		{"region filter ignored", setExpr(`cairn_kms_ready{job="cairn-kms", instance=~"$instance"}`), "ignores the region filter"},
		{"instance filter ignored", setExpr(`cairn_kms_ready{job="cairn-kms", region=~"$region"}`), "ignores the instance filter"},
		{"legend of a dropped label", func(d doc) {
			target(d)["expr"] = `max by (region) (cairn_kms_ready{job="cairn-kms", region=~"$region", instance=~"$instance"})`
		}, "legend {{instance}}"},
		{"a range vector", setExpr(`cairn_kms_ready{job="cairn-kms", region=~"$region", instance=~"$instance"}[5m]`), "want a vector or a scalar"},
		{"no datasource variable", func(d doc) {
			tl := d["templating"].(doc)
			tl["list"] = tl["list"].([]any)[1:]
		}, "no variable datasource"},
		{"variable on a fixed source", func(d doc) {
			d["templating"].(doc)["list"].([]any)[1].(doc)["datasource"] = doc{"type": "prometheus", "uid": "P1"}
		}, "variable region: data source"},
		{"variable query unknown metric", func(d doc) {
			d["templating"].(doc)["list"].([]any)[1].(doc)["query"] = `label_values(cairn_kms_redy{job="cairn-kms"}, region)`
		}, "unknown metric"},
		{"variable on a missing label", func(d doc) {
			d["templating"].(doc)["list"].([]any)[1].(doc)["query"] = `label_values(cairn_kms_ready{job="cairn-kms"}, zone)`
		}, "no label zone"},
		{"panel outside the grid", func(d doc) { panel(d, 0)["gridPos"].(doc)["x"] = 20.0 }, "gridPos"},
		{"no uid", func(d doc) { delete(d, "uid") }, "uid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := load()
			tt.break_(d)
			data, err := json.Marshal(d)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := checkDashboard(data); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("checkDashboard(%s) = %v, want an error containing %q", tt.name, err, tt.want)
			}
		})
	}
	for _, bad := range []string{`{`, `{"uid":"a","title":"b","schemaVersion":39} {}`, `[]`} {
		if _, err := checkDashboard([]byte(bad)); err == nil {
			t.Errorf("checkDashboard(%q) = nil error, want one", bad)
		}
	}
}
