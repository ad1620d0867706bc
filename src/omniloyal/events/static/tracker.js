/*! Omniloyal site tracker. Apache-2.0.
 *
 * <script src="https://loyalty.example.com/t/tracker.js" data-key="olk_..." async></script>
 *
 * - a first-party cookie `ol_aid` (1 year) names the visitor before login;
 * - a page_view on load (data-auto-page-view="false" turns it off), with the page's utm fields;
 * - utm_* of the landing URL are kept for the session and sent with every event;
 * - product views: elements with data-ol-product-view="SKU" (data-ol-price, data-ol-category)
 *   or omniloyal.productView(sku, {price, category});
 * - cart: clicks on [data-ol-add-to-cart="SKU"] / [data-ol-remove-from-cart="SKU"]
 *   (data-ol-price, data-ol-quantity) or omniloyal.addToCart(sku, quantity, price);
 * - omniloyal.identify({email | phone | card}) on login: links the visitor to the member;
 *   omniloyal.reset() on logout;
 * - events are batched and sent to /api/v1/events with navigator.sendBeacon (fetch with
 *   keepalive as a fallback) every few seconds and when the page is hidden.
 *
 * Calls made before the script loads are queued: window.omniloyal = window.omniloyal || [];
 * omniloyal.push(["identify", {email: "..."}]).
 */
(function (window, document) {
  "use strict";

  var previous = window.omniloyal;
  if (previous && previous.__omniloyal) {
    return; // loaded twice
  }

  var COOKIE = "ol_aid";
  var YEAR_SECONDS = 365 * 24 * 3600;
  var UTM_KEY = "ol_utm";
  var MEMBER_KEY = "ol_member";
  var IDENTIFIED_KEY = "ol_identified";
  var UTM_FIELDS = ["utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term"];
  var MESSAGE_PARAMS = ["ol_mid", "message_id"];
  var MAX_BATCH = 50;

  var script = document.currentScript || (function () {
    var all = document.getElementsByTagName("script");
    for (var i = all.length - 1; i >= 0; i--) {
      if ((all[i].src || "").indexOf("/t/tracker.js") !== -1) return all[i];
    }
    return null;
  })();
  var data = (script && script.dataset) || {};

  var config = {
    key: data.key || null,
    endpoint: data.endpoint || (script && script.src ? new URL("/api/v1/events", script.src).href : "/api/v1/events"),
    source: data.source || "web",
    store: data.store || null,
    flushMs: parseInt(data.flushMs || "2000", 10),
    autoPageView: data.autoPageView !== "false"
  };

  var queue = [];
  var timer = null;

  // ------------------------------------------------------------------ storage helpers

  function safe(fn, fallback) {
    try { return fn(); } catch (e) { return fallback; }
  }

  function uuid() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    var bytes = new Uint8Array(16);
    if (window.crypto && window.crypto.getRandomValues) {
      window.crypto.getRandomValues(bytes);
    } else {
      for (var i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = [];
    for (var j = 0; j < 16; j++) hex.push((bytes[j] + 0x100).toString(16).slice(1));
    return hex.slice(0, 4).join("") + "-" + hex.slice(4, 6).join("") + "-" + hex.slice(6, 8).join("") +
      "-" + hex.slice(8, 10).join("") + "-" + hex.slice(10, 16).join("");
  }

  function readCookie(name) {
    var parts = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      var eq = parts[i].indexOf("=");
      if (parts[i].slice(0, eq) === name) return decodeURIComponent(parts[i].slice(eq + 1));
    }
    return null;
  }

  function writeCookie(name, value, seconds) {
    var secure = window.location.protocol === "https:" ? "; Secure" : "";
    document.cookie = name + "=" + encodeURIComponent(value) + "; Max-Age=" + seconds +
      "; Path=/; SameSite=Lax" + secure;
  }

  function anonymousId() {
    var id = readCookie(COOKIE);
    if (!id) id = uuid();
    writeCookie(COOKIE, id, YEAR_SECONDS); // refreshed on every visit: one year after the last
    return id;
  }

  function session(key, value) {
    if (arguments.length === 1) {
      return safe(function () { return JSON.parse(window.sessionStorage.getItem(key) || "null"); }, null);
    }
    safe(function () {
      if (value === null) window.sessionStorage.removeItem(key);
      else window.sessionStorage.setItem(key, JSON.stringify(value));
    });
  }

  function local(key, value) {
    if (arguments.length === 1) {
      return safe(function () { return JSON.parse(window.localStorage.getItem(key) || "null"); }, null);
    }
    safe(function () {
      if (value === null) window.localStorage.removeItem(key);
      else window.localStorage.setItem(key, JSON.stringify(value));
    });
  }

  // ------------------------------------------------------------------ utm and message clicks

  function params() {
    return safe(function () { return new URL(window.location.href).searchParams; }, null);
  }

  function captureUtm() {
    var search = params();
    if (!search) return;
    var found = {};
    var any = false;
    for (var i = 0; i < UTM_FIELDS.length; i++) {
      var value = search.get(UTM_FIELDS[i]);
      if (value) { found[UTM_FIELDS[i]] = value; any = true; }
    }
    if (any) session(UTM_KEY, found); // a new campaign landing replaces the session's utm
  }

  function messageId() {
    var search = params();
    if (!search) return null;
    for (var i = 0; i < MESSAGE_PARAMS.length; i++) {
      var value = search.get(MESSAGE_PARAMS[i]);
      if (value) return value;
    }
    return null;
  }

  // ------------------------------------------------------------------ sending

  function payload(events) {
    var body = { events: events };
    if (config.key) body.key = config.key;
    return JSON.stringify(body);
  }

  function send(events, leaving) {
    if (!events.length) return;
    var body = payload(events);
    // text/plain: a "simple" request, so no CORS preflight and a beacon may carry it.
    if (navigator.sendBeacon) {
      var blob = new Blob([body], { type: "text/plain;charset=UTF-8" });
      if (navigator.sendBeacon(config.endpoint, blob)) return;
    }
    if (window.fetch) {
      window.fetch(config.endpoint, {
        method: "POST",
        body: body,
        keepalive: !!leaving,
        mode: "no-cors",
        credentials: "omit",
        headers: { "Content-Type": "text/plain;charset=UTF-8" }
      }).catch(function () {});
    }
  }

  function flush(leaving) {
    if (timer) { clearTimeout(timer); timer = null; }
    while (queue.length) {
      send(queue.splice(0, MAX_BATCH), leaving);
    }
  }

  function schedule() {
    if (queue.length >= MAX_BATCH) { flush(false); return; }
    if (!timer) timer = setTimeout(function () { timer = null; flush(false); }, config.flushMs);
  }

  function track(type, properties, extra) {
    var event = {
      id: uuid(),
      type: type,
      occurred_at: new Date().toISOString(),
      anonymous_id: state.anonymousId,
      source: config.source,
      url: window.location.href,
      properties: properties || {}
    };
    if (document.referrer) event.referrer = document.referrer;
    if (config.store) event.store = config.store;
    var utm = session(UTM_KEY);
    if (utm) event.utm = utm;
    var member = (extra && extra.member) || local(MEMBER_KEY);
    if (member) event.member = member;
    queue.push(event);
    schedule();
    return event.id;
  }

  // ------------------------------------------------------------------ public API

  function productView(sku, props) {
    var p = { sku: String(sku) };
    if (props) for (var k in props) if (Object.prototype.hasOwnProperty.call(props, k)) p[k] = props[k];
    return track("product_view", p);
  }

  function cart(type, sku, quantity, price, props) {
    var p = { sku: String(sku), quantity: quantity == null ? 1 : quantity };
    if (price != null) p.price = price;
    if (props) for (var k in props) if (Object.prototype.hasOwnProperty.call(props, k)) p[k] = props[k];
    return track(type, p);
  }

  function memberRef(who) {
    var ref = {};
    if (who.email) ref.email = String(who.email);
    else if (who.phone) ref.phone = String(who.phone);
    else if (who.card) ref.card = String(who.card);
    else if (who.id) ref.id = who.id;
    else if (who.external_id) ref.external_id = String(who.external_id);
    else return null;
    return ref;
  }

  function identify(who) {
    var ref = who && memberRef(who);
    if (!ref) return null;
    var signature = JSON.stringify(ref);
    local(MEMBER_KEY, ref);
    if (session(IDENTIFIED_KEY) === signature) return null; // once per session and identity
    session(IDENTIFIED_KEY, signature);
    var id = track("identify", {}, { member: ref });
    flush(false);
    return id;
  }

  function reset() {
    local(MEMBER_KEY, null);
    session(IDENTIFIED_KEY, null);
  }

  var state = {
    anonymousId: null
  };

  var api = {
    __omniloyal: true,
    init: function (options) {
      for (var k in options) if (Object.prototype.hasOwnProperty.call(options, k)) config[k] = options[k];
      return api;
    },
    track: track,
    pageView: function (props) { return track("page_view", props || { title: document.title }); },
    sectionView: function (section, props) {
      var p = props || {}; p.section = section; return track("section_view", p);
    },
    productView: productView,
    categoryView: function (category, props) {
      var p = props || {}; p.category = category; return track("category_view", p);
    },
    search: function (query, props) { var p = props || {}; p.query = query; return track("search", p); },
    addToCart: function (sku, quantity, price, props) { return cart("add_to_cart", sku, quantity, price, props); },
    removeFromCart: function (sku, quantity, price, props) {
      return cart("remove_from_cart", sku, quantity, price, props);
    },
    orderPlaced: function (orderId, amount, props) {
      var p = props || {}; p.order_id = String(orderId); p.amount = amount; return track("order_placed", p);
    },
    login: function (who) { var ref = memberRef(who || {}); if (ref) local(MEMBER_KEY, ref); return track("login", {}, { member: ref }); },
    custom: function (name, props) { var p = props || {}; p.name = name; return track("custom", p); },
    identify: identify,
    reset: reset,
    flush: function () { flush(false); },
    anonymousId: function () { return state.anonymousId; },
    config: config,
    // the queue form: omniloyal.push(["identify", {...}])
    push: function (call) {
      if (!call || !call.length) return;
      var fn = api[call[0]];
      if (typeof fn === "function") fn.apply(api, Array.prototype.slice.call(call, 1));
    }
  };

  // ------------------------------------------------------------------ start

  function dataAttributes(root) {
    var views = root.querySelectorAll("[data-ol-product-view]");
    for (var i = 0; i < views.length; i++) {
      var el = views[i];
      var props = {};
      if (el.getAttribute("data-ol-price")) props.price = el.getAttribute("data-ol-price");
      if (el.getAttribute("data-ol-category")) props.category = el.getAttribute("data-ol-category");
      productView(el.getAttribute("data-ol-product-view"), props);
    }
  }

  function onClick(e) {
    var el = e.target && e.target.closest ? e.target.closest("[data-ol-add-to-cart],[data-ol-remove-from-cart]") : null;
    if (!el) return;
    var adding = el.hasAttribute("data-ol-add-to-cart");
    var sku = el.getAttribute(adding ? "data-ol-add-to-cart" : "data-ol-remove-from-cart");
    var quantity = el.getAttribute("data-ol-quantity") || 1;
    var price = el.getAttribute("data-ol-price");
    cart(adding ? "add_to_cart" : "remove_from_cart", sku, quantity, price);
  }

  function start() {
    state.anonymousId = anonymousId();
    captureUtm();
    if (config.autoPageView) {
      var props = { title: document.title };
      var mid = messageId();
      if (mid) props.message_id = mid; // a click from a message: links the visitor to the member
      track("page_view", props);
    }
    dataAttributes(document);
    document.addEventListener("click", onClick, true);
    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "hidden") flush(true);
    });
    window.addEventListener("pagehide", function () { flush(true); });
  }

  window.omniloyal = api;
  start();
  if (previous && previous.length) {
    for (var q = 0; q < previous.length; q++) api.push(previous[q]);
  }
})(window, document);
