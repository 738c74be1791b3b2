// Package monitoring holds the Cairn fleet's Prometheus alerting rules
// (cairn-alerts.yaml) and Grafana dashboard (cairn-dashboard.json), embedded,
// with parsers that check their structure and the list of every metric they
// query, so that a test can scrape real servers and check that each exists.
//
// The files are the deliverable: load them into Prometheus and Grafana as
// README.md says. This package only reads them; no Cairn binary imports it.
package monitoring

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"
)

// The embedded files and their names, as errors cite them.
const (
	RulesFile     = "cairn-alerts.yaml"
	DashboardFile = "cairn-dashboard.json"
)

//go:embed cairn-alerts.yaml
var rulesYAML []byte

//go:embed cairn-dashboard.json
var dashboardJSON []byte

// RulesYAML returns a copy of cairn-alerts.yaml as shipped.
func RulesYAML() []byte { return bytes.Clone(rulesYAML) }

// DashboardJSON returns a copy of cairn-dashboard.json as shipped.
func DashboardJSON() []byte { return bytes.Clone(dashboardJSON) }

// Severities are the values a rule's severity label may take: "page" wakes
// someone up, "ticket" is for the working day.
var Severities = []string{"page", "ticket"}

// MinFor is the shortest "for" a rule may have: every alert must hold for
// a few scrapes before it fires.
const MinFor = time.Minute

// Rule is one alerting rule.
type Rule struct {
	// Group is the name of the rule group the rule is in.
	Group string
	// Alert is the alert's name, e.g. "CairnKMSNotReady".
	Alert string
	// Expr is the PromQL expression; the alert fires for each series it
	// returns.
	Expr string
	// For is how long the expression must hold before the alert fires.
	For time.Duration
	// Severity is Labels["severity"]: one of Severities.
	Severity string
	// Labels are the labels the rule adds to its alerts.
	Labels map[string]string
	// Annotations hold "summary" and "description", Go templates that
	// Prometheus expands with $labels and $value.
	Annotations map[string]string
}

// Rules returns the alerting rules of cairn-alerts.yaml, in file order.
func Rules() ([]Rule, error) { return parseRules(rulesYAML) }

// The rule file's schema: Prometheus's, restricted to what Cairn uses.
// Decoding refuses any other key (a typo such as "anotations", a recording
// rule, keep_firing_for) instead of dropping it.
type ruleFile struct {
	Groups []ruleGroup `yaml:"groups"`
}

type ruleGroup struct {
	Name  string     `yaml:"name"`
	Rules []ruleNode `yaml:"rules"`
}

type ruleNode struct {
	Alert       string            `yaml:"alert"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

var (
	alertNameRE = regexp.MustCompile(`^Cairn[A-Z][A-Za-z0-9]*$`)
	labelNameRE = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)
)

// requiredAnnotations are the annotations every rule has, and the only ones.
var requiredAnnotations = []string{"summary", "description"}

// parseRules decodes a rule file strictly and checks every rule's
// structure. It does not check PromQL (that is monitoring_test.go's job,
// with Prometheus's own parser).
func parseRules(data []byte) ([]Rule, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var f ruleFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("monitoring: %s: %w", RulesFile, err)
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("monitoring: %s: more than one YAML document", RulesFile)
	}
	if len(f.Groups) == 0 {
		return nil, fmt.Errorf("monitoring: %s: no groups", RulesFile)
	}
	var rules []Rule
	groups := map[string]bool{}
	alerts := map[string]string{}
	for gi, g := range f.Groups {
		if g.Name == "" {
			return nil, fmt.Errorf("monitoring: %s: group %d has no name", RulesFile, gi+1)
		}
		if groups[g.Name] {
			return nil, fmt.Errorf("monitoring: %s: group %q defined twice", RulesFile, g.Name)
		}
		groups[g.Name] = true
		if len(g.Rules) == 0 {
			return nil, fmt.Errorf("monitoring: %s: group %q has no rules", RulesFile, g.Name)
		}
		for ri, n := range g.Rules {
			r, err := n.rule(g.Name)
			if err != nil {
				return nil, fmt.Errorf("monitoring: %s: group %q rule %d (%s): %w", RulesFile, g.Name, ri+1, n.Alert, err)
			}
			if prev, dup := alerts[r.Alert]; dup {
				return nil, fmt.Errorf("monitoring: %s: alert %s defined twice (groups %q and %q)", RulesFile, r.Alert, prev, g.Name)
			}
			alerts[r.Alert] = g.Name
			rules = append(rules, r)
		}
	}
	return rules, nil
}

func (n ruleNode) rule(group string) (Rule, error) {
	if !alertNameRE.MatchString(n.Alert) {
		return Rule{}, fmt.Errorf("alert: %q: want a CamelCase name starting with Cairn", n.Alert)
	}
	if strings.TrimSpace(n.Expr) == "" {
		return Rule{}, errors.New("expr: missing")
	}
	if n.For == "" {
		return Rule{}, errors.New("for: missing")
	}
	d, err := model.ParseDuration(n.For)
	if err != nil {
		return Rule{}, fmt.Errorf("for: %w", err)
	}
	if time.Duration(d) < MinFor {
		return Rule{}, fmt.Errorf("for: %s: want at least %s", n.For, MinFor)
	}
	sev, ok := n.Labels["severity"]
	if !ok {
		return Rule{}, errors.New("labels: no severity")
	}
	if !slices.Contains(Severities, sev) {
		return Rule{}, fmt.Errorf("labels: severity %q: want one of %v", sev, Severities)
	}
	for k := range n.Labels {
		if !labelNameRE.MatchString(k) {
			return Rule{}, fmt.Errorf("labels: %q is not a label name", k)
		}
	}
	for _, k := range requiredAnnotations {
		if strings.TrimSpace(n.Annotations[k]) == "" {
			return Rule{}, fmt.Errorf("annotations: no %s", k)
		}
	}
	for k := range n.Annotations {
		if !slices.Contains(requiredAnnotations, k) {
			return Rule{}, fmt.Errorf("annotations: unknown %q (want %v)", k, requiredAnnotations)
		}
	}
	return Rule{Group: group, Alert: n.Alert, Expr: strings.TrimSpace(n.Expr), For: time.Duration(d),
		Severity: sev, Labels: n.Labels, Annotations: n.Annotations}, nil
}

// Datasource is a Grafana data source reference.
type Datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// PrometheusSource is the data source every panel and target uses: the
// Prometheus source chosen in the dashboard's "datasource" variable.
var PrometheusSource = Datasource{Type: "prometheus", UID: "${datasource}"}

// Board is the part of cairn-dashboard.json that can be checked: the
// rest (units, colours, options) is Grafana's business.
type Board struct {
	UID           string
	Title         string
	SchemaVersion int
	// Variables are the templating variables, in order.
	Variables []Variable
	// Panels are every panel in file order: rows included, and the panels
	// of a collapsed row right after it.
	Panels []Panel
}

// Variable is a templating variable.
type Variable struct {
	Name string
	// Type is "datasource", "query", ...
	Type string
	// Query is the data source type of a "datasource" variable, or the
	// query of a "query" variable (label_values(SELECTOR, LABEL)).
	Query      string
	Datasource *Datasource
}

// Panel is a dashboard panel.
type Panel struct {
	ID    int
	Type  string
	Title string
	// Datasource is nil on rows.
	Datasource *Datasource
	Targets    []Target
	// X, Y, W, H are the grid position (24 columns).
	X, Y, W, H int
}

// Target is one query of a panel.
type Target struct {
	RefID        string
	Expr         string
	LegendFormat string
	Instant      bool
	// Datasource is nil when the target inherits its panel's.
	Datasource *Datasource
}

// The dashboard JSON as far as Board goes; other keys are ignored.
type dashboardDoc struct {
	UID           string `json:"uid"`
	Title         string `json:"title"`
	SchemaVersion int    `json:"schemaVersion"`
	Templating    struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"`
			Datasource *Datasource     `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
	Panels []panelDoc `json:"panels"`
}

type panelDoc struct {
	ID         int         `json:"id"`
	Type       string      `json:"type"`
	Title      string      `json:"title"`
	Datasource *Datasource `json:"datasource"`
	GridPos    struct {
		X int `json:"x"`
		Y int `json:"y"`
		W int `json:"w"`
		H int `json:"h"`
	} `json:"gridPos"`
	Targets []struct {
		RefID        string      `json:"refId"`
		Expr         string      `json:"expr"`
		LegendFormat string      `json:"legendFormat"`
		Instant      bool        `json:"instant"`
		Datasource   *Datasource `json:"datasource"`
	} `json:"targets"`
	// Panels are a collapsed row's panels.
	Panels []panelDoc `json:"panels"`
}

// Dashboard returns cairn-dashboard.json, parsed and checked.
func Dashboard() (*Board, error) { return parseDashboard(dashboardJSON) }

// parseDashboard decodes a dashboard and checks its structure: unique
// positive panel ids, a Prometheus data source variable, every panel but
// rows on PrometheusSource with at least one target, every target with an
// expression. PromQL itself is checked by monitoring_test.go.
func parseDashboard(data []byte) (*Board, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	var doc dashboardDoc
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("monitoring: %s: %w", DashboardFile, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("monitoring: %s: data after the dashboard", DashboardFile)
	}
	if doc.UID == "" || doc.Title == "" || doc.SchemaVersion <= 0 {
		return nil, fmt.Errorf("monitoring: %s: uid, title and schemaVersion are required", DashboardFile)
	}
	d := &Board{UID: doc.UID, Title: doc.Title, SchemaVersion: doc.SchemaVersion}
	names := map[string]bool{}
	for i, v := range doc.Templating.List {
		q, err := variableQuery(v.Query)
		if err != nil {
			return nil, fmt.Errorf("monitoring: %s: variable %d (%s): %w", DashboardFile, i+1, v.Name, err)
		}
		if !labelNameRE.MatchString(v.Name) || names[v.Name] {
			return nil, fmt.Errorf("monitoring: %s: variable %d: name %q missing, invalid or used twice", DashboardFile, i+1, v.Name)
		}
		names[v.Name] = true
		d.Variables = append(d.Variables, Variable{Name: v.Name, Type: v.Type, Query: q, Datasource: v.Datasource})
	}
	if !slices.ContainsFunc(d.Variables, func(v Variable) bool {
		return v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus"
	}) {
		return nil, fmt.Errorf("monitoring: %s: no variable datasource of type datasource for prometheus", DashboardFile)
	}
	for _, v := range d.Variables {
		if v.Type == "query" && (v.Datasource == nil || *v.Datasource != PrometheusSource) {
			return nil, fmt.Errorf("monitoring: %s: variable %s: data source %v, want %v", DashboardFile, v.Name, v.Datasource, PrometheusSource)
		}
	}
	ids := map[int]string{}
	var walk func([]panelDoc, bool) error
	walk = func(ps []panelDoc, inRow bool) error {
		for _, p := range ps {
			if err := d.addPanel(p, ids, inRow); err != nil {
				return fmt.Errorf("monitoring: %s: panel %d (%q): %w", DashboardFile, p.ID, p.Title, err)
			}
			if err := walk(p.Panels, true); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(doc.Panels, false); err != nil {
		return nil, err
	}
	if len(d.Panels) == 0 {
		return nil, fmt.Errorf("monitoring: %s: no panels", DashboardFile)
	}
	return d, nil
}

// variableQuery returns a variable's query, written either as a string or
// as Grafana's Prometheus variable editor object {"query": ...}.
func variableQuery(raw json.RawMessage) (string, error) {
	if len(raw) == 0 {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var o struct {
		Query string `json:"query"`
	}
	if err := json.Unmarshal(raw, &o); err != nil {
		return "", fmt.Errorf("query: want a string or an object with a query: %w", err)
	}
	return o.Query, nil
}

func (d *Board) addPanel(p panelDoc, ids map[int]string, inRow bool) error {
	if p.ID <= 0 {
		return errors.New("no id")
	}
	if prev, dup := ids[p.ID]; dup {
		return fmt.Errorf("id used twice (also by %q)", prev)
	}
	ids[p.ID] = p.Title
	if p.Title == "" {
		return errors.New("no title")
	}
	g := p.GridPos
	if g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
		return fmt.Errorf("gridPos %+v outside the 24-column grid", g)
	}
	out := Panel{ID: p.ID, Type: p.Type, Title: p.Title, Datasource: p.Datasource, X: g.X, Y: g.Y, W: g.W, H: g.H}
	if p.Type == "row" {
		if inRow {
			return errors.New("a row inside a row")
		}
		if len(p.Targets) > 0 {
			return errors.New("a row with targets")
		}
		d.Panels = append(d.Panels, out)
		return nil
	}
	if len(p.Panels) > 0 {
		return errors.New("only rows hold panels")
	}
	if p.Datasource == nil || *p.Datasource != PrometheusSource {
		return fmt.Errorf("data source %v, want %v", p.Datasource, PrometheusSource)
	}
	if len(p.Targets) == 0 {
		return errors.New("no targets")
	}
	refs := map[string]bool{}
	for i, t := range p.Targets {
		if strings.TrimSpace(t.Expr) == "" {
			return fmt.Errorf("target %d (%s): empty expr", i+1, t.RefID)
		}
		if t.RefID == "" || refs[t.RefID] {
			return fmt.Errorf("target %d: refId %q missing or used twice", i+1, t.RefID)
		}
		refs[t.RefID] = true
		if t.Datasource != nil && *t.Datasource != PrometheusSource {
			return fmt.Errorf("target %s: data source %v, want %v", t.RefID, *t.Datasource, PrometheusSource)
		}
		out.Targets = append(out.Targets, Target{RefID: t.RefID, Expr: t.Expr, LegendFormat: t.LegendFormat,
			Instant: t.Instant, Datasource: t.Datasource})
	}
	d.Panels = append(d.Panels, out)
	return nil
}

// labelValuesRE matches a label_values(SELECTOR, LABEL) variable query.
var labelValuesRE = regexp.MustCompile(`^label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$`)

// LabelValuesQuery splits a label_values(SELECTOR, LABEL) variable query.
func LabelValuesQuery(q string) (selector, label string, ok bool) {
	m := labelValuesRE.FindStringSubmatch(strings.TrimSpace(q))
	if m == nil {
		return "", "", false
	}
	return strings.TrimSpace(m[1]), m[2], true
}

// MetricNames returns every metric name that an alert expression, a
// dashboard target or a dashboard variable query selects, sorted and
// without duplicates.
//
// Names are returned as the queries use them, which is how the text
// exposition format names series: a histogram appears as NAME_bucket (or
// NAME_sum, NAME_count), not as its family NAME. A check against gathered
// metric families (Registry.Gather, expfmt) must strip that suffix when
// NAME is a histogram family.
func MetricNames() ([]string, error) {
	rules, err := Rules()
	if err != nil {
		return nil, err
	}
	d, err := Dashboard()
	if err != nil {
		return nil, err
	}
	var exprs []string
	for _, r := range rules {
		exprs = append(exprs, r.Expr)
	}
	for _, p := range d.Panels {
		for _, t := range p.Targets {
			exprs = append(exprs, t.Expr)
		}
	}
	for _, v := range d.Variables {
		if v.Type != "query" {
			continue
		}
		sel, _, ok := LabelValuesQuery(v.Query)
		if !ok {
			return nil, fmt.Errorf("monitoring: %s: variable %s: query %q: want label_values(SELECTOR, LABEL)", DashboardFile, v.Name, v.Query)
		}
		exprs = append(exprs, sel)
	}
	var names []string
	for _, e := range exprs {
		ns, err := metricNames(e)
		if err != nil {
			return nil, fmt.Errorf("monitoring: %q: %w", e, err)
		}
		names = append(names, ns...)
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// promKeywords are PromQL words that are never metric names: binary and
// aggregation operators and modifiers. PromQL matches them in any case.
var promKeywords = map[string]bool{
	"and": true, "or": true, "unless": true, "atan2": true, "bool": true, "offset": true,
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
	"sum": true, "avg": true, "count": true, "min": true, "max": true, "group": true, "stddev": true,
	"stdvar": true, "topk": true, "bottomk": true, "count_values": true, "quantile": true,
	"limitk": true, "limit_ratio": true, "start": true, "end": true, "inf": true, "nan": true,
	"anchored": true, "smoothed": true,
}

// promLabelLists are the keywords followed by a parenthesised label list.
var promLabelLists = map[string]bool{
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
}

// metricNames lists the metric names a PromQL expression selects by name,
// in order of appearance. It is a lexer, not a parser: it skips strings,
// label matchers {...}, ranges [...] (so Grafana's $variables there do not
// matter), numbers and durations, keywords, label lists and function names
// (an identifier followed by "("). monitoring_test.go checks that it finds
// exactly what Prometheus's parser finds in every shipped expression.
func metricNames(expr string) ([]string, error) {
	var names []string
	s := expr
	i := 0
	skipSpace := func() {
		for i < len(s) && strings.ContainsRune(" \t\r\n", rune(s[i])) {
			i++
		}
	}
	// skipTo consumes up to and including the close that balances the
	// open at s[i], skipping quoted strings.
	skipTo := func(open, close byte) error {
		depth := 0
		for i < len(s) {
			switch c := s[i]; c {
			case '"', '\'', '`':
				if err := skipString(s, &i); err != nil {
					return err
				}
				continue
			case open:
				depth++
			case close:
				depth--
				if depth == 0 {
					i++
					return nil
				}
			}
			i++
		}
		return fmt.Errorf("unbalanced %q", open)
	}
	for i < len(s) {
		c := s[i]
		switch {
		case c == '#':
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '"' || c == '\'' || c == '`':
			if err := skipString(s, &i); err != nil {
				return nil, err
			}
		case c == '{':
			if err := skipTo('{', '}'); err != nil {
				return nil, err
			}
		case c == '[':
			if err := skipTo('[', ']'); err != nil {
				return nil, err
			}
		case c == '}' || c == ']':
			return nil, fmt.Errorf("unbalanced %q", c)
		case isDigit(c) || (c == '.' && i+1 < len(s) && isDigit(s[i+1])):
			for i < len(s) && (isIdent(s[i]) || s[i] == '.' || ((s[i] == '+' || s[i] == '-') && (s[i-1] == 'e' || s[i-1] == 'E'))) {
				i++
			}
		case c == '$':
			// A Grafana variable outside a string or range: not PromQL's.
			i++
			for i < len(s) && (isIdent(s[i]) || s[i] == '{' || s[i] == '}') {
				i++
			}
		case isIdentStart(c):
			start := i
			for i < len(s) && isIdent(s[i]) {
				i++
			}
			word := s[start:i]
			lower := strings.ToLower(word)
			skipSpace()
			next := byte(0)
			if i < len(s) {
				next = s[i]
			}
			switch {
			case promLabelLists[lower]:
				if next == '(' {
					if err := skipTo('(', ')'); err != nil {
						return nil, err
					}
				}
			case promKeywords[lower]:
			case next == '(':
				// A function call.
			default:
				names = append(names, word)
			}
		default:
			i++
		}
	}
	return names, nil
}

// skipString advances *i past the quoted string that starts at s[*i].
func skipString(s string, i *int) error {
	q := s[*i]
	for j := *i + 1; j < len(s); j++ {
		switch s[j] {
		case '\\':
			if q != '`' {
				j++
			}
		case q:
			*i = j + 1
			return nil
		}
	}
	return fmt.Errorf("unterminated string at %d", *i)
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }
func isIdentStart(c byte) bool {
	return c == '_' || c == ':' || ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z')
}
func isIdent(c byte) bool { return isIdentStart(c) || isDigit(c) }
